/*
 * ntfs-tool: changes an NTFS filesystem image through libntfs-3g without mounting it (no
 * root, no FUSE), for what ntfs-3g's own tools cannot do. Names are UTF-8 and need a UTF-8
 * locale (run with LC_ALL=C.UTF-8).
 *
 *   ntfs-tool IMAGE mkdir DIR...            create directories and their missing parents
 *   ntfs-tool IMAGE write-fragmented DEST SRC FILLER CHUNK
 *                                           copy host file SRC to DEST in about
 *                                           size/CHUNK fragments, FILLER's clusters between
 *   ntfs-tool IMAGE set-flags HEX           write the volume flags ($Volume), e.g. 1 = dirty
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
#include <ntfs-3g/attrib.h>
#include <ntfs-3g/unistr.h>

/* Opens (creating when missing) each component of path below `dir`; the last one with
 * mode `last_type` (S_IFDIR or S_IFREG). Consumes `dir`; returns the inode or NULL. */
static ntfs_inode *open_path(ntfs_volume *vol, const char *path, mode_t last_type)
{
	char *copy = strdup(path);
	ntfs_inode *dir = ntfs_inode_open(vol, FILE_root);
	if (!copy || !dir) {
		free(copy);
		return NULL;
	}
	char *save = NULL;
	char *name = strtok_r(copy, "/", &save);
	while (name && dir) {
		char *next = strtok_r(NULL, "/", &save);
		mode_t type = next ? S_IFDIR : last_type;
		ntfschar *uname = NULL;
		int len = ntfs_mbstoucs(name, &uname);
		if (len < 0 || len > 255) {
			fprintf(stderr, "ntfs-tool: cannot encode \"%s\" (need a UTF-8 locale, at most 255 characters)\n", name);
			ntfs_inode_close(dir);
			dir = NULL;
			break;
		}
		ntfs_inode *child;
		u64 mref = ntfs_inode_lookup_by_name(dir, uname, len);
		if (mref == (u64)-1) {
			child = ntfs_create(dir, const_cpu_to_le32(0), uname, (u8)len, type);
		} else {
			child = ntfs_inode_open(vol, MREF(mref));
			int is_dir = child && (child->mrec->flags & MFT_RECORD_IS_DIRECTORY);
			if (child && is_dir != (type == S_IFDIR)) {
				fprintf(stderr, "ntfs-tool: \"%s\" in %s exists and is %s a directory\n", name, path, is_dir ? "" : "not");
				ntfs_inode_close(child);
				child = NULL;
				errno = EEXIST;
			}
		}
		free(uname);
		ntfs_inode_close(dir);
		dir = child;
		name = next;
	}
	free(copy);
	return dir;
}

static int cmd_mkdir(ntfs_volume *vol, int n, char **dirs)
{
	for (int i = 0; i < n; i++) {
		ntfs_inode *ni = open_path(vol, dirs[i], S_IFDIR);
		if (!ni) {
			fprintf(stderr, "ntfs-tool: cannot create %s: %s\n", dirs[i], strerror(errno));
			return 1;
		}
		ntfs_inode_close(ni);
	}
	return 0;
}

/* The first cluster after the last allocated run of a non-resident attribute, or -1. */
static LCN end_of_allocation(ntfs_attr *na)
{
	LCN end = -1;
	if (!NAttrNonResident(na) || ntfs_attr_map_whole_runlist(na))
		return -1;
	for (runlist_element *rl = na->rl; rl && rl->length; rl++)
		if (rl->lcn >= 0)
			end = rl->lcn + rl->length;
	return end;
}

/* Copies host file SRC to DEST in CHUNK-byte appends and puts one cluster of FILLER after
 * each: libntfs-3g extends a file right after its last run when that cluster is free, and
 * otherwise at the volume's data zone position, which this sets just past the filler's
 * cluster. DEST ends up in size/CHUNK fragments laid out D..D F D..D F …, compactly. */
static int cmd_write_fragmented(ntfs_volume *vol, const char *dest, const char *src, const char *filler, long chunk)
{
	FILE *in = fopen(src, "rb");
	if (!in) {
		perror(src);
		return 1;
	}
	ntfs_inode *ni = open_path(vol, dest, S_IFREG);
	ntfs_inode *fi = ni ? open_path(vol, filler, S_IFREG) : NULL;
	ntfs_attr *na = ni ? ntfs_attr_open(ni, AT_DATA, AT_UNNAMED, 0) : NULL;
	ntfs_attr *fa = fi ? ntfs_attr_open(fi, AT_DATA, AT_UNNAMED, 0) : NULL;
	char *buf = malloc(chunk);
	char *pad = calloc(1, vol->cluster_size);
	int rc = 1;
	if (!na || !fa || !buf || !pad) {
		fprintf(stderr, "ntfs-tool: cannot open %s or %s for writing: %s\n", dest, filler, strerror(errno));
		goto out;
	}
	s64 pos = 0, fpos = 0;
	for (;;) {
		size_t got = fread(buf, 1, chunk, in);
		if (got == 0)
			break;
		LCN fend = end_of_allocation(fa);
		if (fend >= 0)
			vol->data1_zone_pos = fend;
		if (ntfs_attr_pwrite(na, pos, got, buf) != (s64)got) {
			fprintf(stderr, "ntfs-tool: writing %s failed at %lld: %s\n", dest, (long long)pos, strerror(errno));
			goto out;
		}
		pos += got;
		LCN dend = end_of_allocation(na);
		if (dend >= 0)
			vol->data1_zone_pos = dend;
		if (ntfs_attr_pwrite(fa, fpos, vol->cluster_size, pad) != (s64)vol->cluster_size) {
			fprintf(stderr, "ntfs-tool: writing %s failed: %s\n", filler, strerror(errno));
			goto out;
		}
		fpos += vol->cluster_size;
	}
	rc = ferror(in) ? 1 : 0;
out:
	if (na)
		ntfs_attr_close(na);
	if (fa)
		ntfs_attr_close(fa);
	if (ni)
		ntfs_inode_close(ni);
	if (fi)
		ntfs_inode_close(fi);
	free(buf);
	free(pad);
	fclose(in);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: ntfs-tool IMAGE mkdir DIR... | write-fragmented DEST SRC FILLER CHUNK | set-flags HEX\n");
		return 2;
	}
	ntfs_set_locale();
	ntfs_volume *vol = ntfs_mount(argv[1], 0);
	if (!vol) {
		perror("ntfs-tool: cannot open the NTFS volume");
		return 1;
	}
	int rc;
	if (!strcmp(argv[2], "mkdir")) {
		rc = cmd_mkdir(vol, argc - 3, argv + 3);
	} else if (!strcmp(argv[2], "write-fragmented") && argc == 7) {
		long chunk = strtol(argv[6], NULL, 0);
		rc = chunk > 0 ? cmd_write_fragmented(vol, argv[3], argv[4], argv[5], chunk) : 2;
	} else if (!strcmp(argv[2], "set-flags") && argc == 4) {
		rc = ntfs_volume_write_flags(vol, cpu_to_le16((u16)strtoul(argv[3], NULL, 16))) ? 1 : 0;
		if (rc)
			perror("ntfs-tool: cannot write the volume flags");
	} else {
		fprintf(stderr, "ntfs-tool: unknown command %s\n", argv[2]);
		rc = 2;
	}
	/* set-flags: ntfs_umount would clear the dirty flag it set itself on mount, not ours */
	if (ntfs_umount(vol, FALSE) != 0) {
		perror("ntfs-tool: cannot close the NTFS volume");
		rc = 1;
	}
	return rc;
}
