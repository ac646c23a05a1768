/*
 * ntfs-mkdir IMAGE DIR...: creates directories (and their missing parents) inside an NTFS
 * filesystem image through libntfs-3g, without mounting it (no root, no FUSE). ntfs-3g's
 * own tools can copy files in (ntfscp) but cannot create directories. Names are UTF-8 and
 * need a UTF-8 locale (run with LC_ALL=C.UTF-8).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <ntfs-3g/types.h>
#include <ntfs-3g/volume.h>
#include <ntfs-3g/inode.h>
#include <ntfs-3g/dir.h>
#include <ntfs-3g/unistr.h>

static int mkdir_p(ntfs_volume *vol, const char *path)
{
	char *copy = strdup(path);
	ntfs_inode *dir = ntfs_inode_open(vol, FILE_root);
	int rc = 0;
	if (!copy || !dir) {
		free(copy);
		return -1;
	}
	for (char *save = NULL, *name = strtok_r(copy, "/", &save); name; name = strtok_r(NULL, "/", &save)) {
		ntfschar *uname = NULL;
		int len = ntfs_mbstoucs(name, &uname);
		if (len < 0 || len > 255) {
			fprintf(stderr, "ntfs-mkdir: cannot encode \"%s\" (need a UTF-8 locale, at most 255 characters)\n", name);
			rc = -1;
			break;
		}
		ntfs_inode *child;
		u64 mref = ntfs_inode_lookup_by_name(dir, uname, len);
		if (mref == (u64)-1) {
			child = ntfs_create(dir, const_cpu_to_le32(0), uname, (u8)len, S_IFDIR);
		} else {
			child = ntfs_inode_open(vol, MREF(mref));
			if (child && !(child->mrec->flags & MFT_RECORD_IS_DIRECTORY)) {
				fprintf(stderr, "ntfs-mkdir: \"%s\" in %s exists and is not a directory\n", name, path);
				ntfs_inode_close(child);
				child = NULL;
				errno = ENOTDIR;
			}
		}
		free(uname);
		ntfs_inode_close(dir);
		dir = child;
		if (!dir) {
			rc = -1;
			break;
		}
	}
	if (dir)
		ntfs_inode_close(dir);
	free(copy);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: ntfs-mkdir IMAGE DIR...\n");
		return 2;
	}
	ntfs_set_locale();
	ntfs_volume *vol = ntfs_mount(argv[1], 0);
	if (!vol) {
		perror("ntfs-mkdir: cannot open the NTFS volume");
		return 1;
	}
	int rc = 0;
	for (int i = 2; i < argc; i++) {
		if (mkdir_p(vol, argv[i]) != 0) {
			fprintf(stderr, "ntfs-mkdir: cannot create %s: %s\n", argv[i], strerror(errno));
			rc = 1;
			break;
		}
	}
	if (ntfs_umount(vol, FALSE) != 0) {
		perror("ntfs-mkdir: cannot close the NTFS volume");
		rc = 1;
	}
	return rc;
}
