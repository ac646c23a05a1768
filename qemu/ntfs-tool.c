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
 *   ntfs-tool IMAGE reserve DIR CHUNK FIRST+COUNT...
 *                                           keep clusters FIRST..FIRST+COUNT-1 of each range in
 *                                           files of DIR (hidden, system) that nothing else uses
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

/* One filler file of cmd_reserve: its MFT reference and its runs. */
struct filler {
	u64 mref;
	int nruns;
	LCN *lcn;
	s64 *len;
};

/* The runs of `na` copied into f (holes left out). */
static int take_runs(ntfs_attr *na, struct filler *f)
{
	if (!NAttrNonResident(na))
		return 0;
	if (ntfs_attr_map_whole_runlist(na))
		return -1;
	int n = 0;
	for (runlist_element *rl = na->rl; rl && rl->length; rl++)
		n++;
	f->lcn = calloc(n ? n : 1, sizeof(LCN));
	f->len = calloc(n ? n : 1, sizeof(s64));
	if (!f->lcn || !f->len)
		return -1;
	for (runlist_element *rl = na->rl; rl && rl->length; rl++)
		if (rl->lcn >= 0) {
			f->lcn[f->nruns] = rl->lcn;
			f->len[f->nruns++] = rl->length;
		}
	return 0;
}

/* Sets the hidden and system attributes (written to the MFT record and the directory entry at close). */
static void set_hidden_system(ntfs_inode *ni)
{
	ni->flags |= FILE_ATTR_HIDDEN | FILE_ATTR_SYSTEM;
	NInoSetDirty(ni);
	NInoFileNameSetDirty(ni);
}

/* Keeps clusters [first, first+count) of each range out of every other file's reach: the
 * free space is filled with files in a scratch folder /$RESERVE-FILL (CHUNK bytes each,
 * then one cluster each for what is left); those holding a cluster of a range move to DIR
 * (hidden, system, named reserved-LCN after their first cluster), the others are deleted,
 * then the scratch folder. The allocator cannot be told to take given clusters, but it takes
 * every free one before it fails. Fails when a cluster of a range belongs to something else
 * (the volume's own metadata), leaving the fillers where they are: make the image again. The fillers hold 0xa5 bytes, not
 * zeros, so the free space left behind does too: a device that drops writes shows where. */
static int cmd_reserve(ntfs_volume *vol, const char *dir, long chunk, int nranges, char **ranges)
{
	LCN first[64];
	s64 count[64];
	if (nranges > 64) {
		fprintf(stderr, "ntfs-tool: at most 64 ranges\n");
		return 2;
	}
	for (int r = 0; r < nranges; r++) {
		char *end;
		first[r] = strtoll(ranges[r], &end, 0);
		count[r] = *end == '+' ? strtoll(end + 1, &end, 0) : -1;
		if (*end || first[r] < 0 || count[r] <= 0 || first[r] + count[r] > vol->nr_clusters) {
			fprintf(stderr, "ntfs-tool: range %s is not FIRST+COUNT within the volume's %lld clusters\n", ranges[r], (long long)vol->nr_clusters);
			return 2;
		}
	}
	static const char scratch[] = "$RESERVE-FILL";
	ntfs_inode *dni = open_path(vol, dir, S_IFDIR);
	ntfs_inode *sni = dni ? open_path(vol, scratch, S_IFDIR) : NULL;
	if (!sni) {
		fprintf(stderr, "ntfs-tool: cannot create %s or /%s: %s\n", dir, scratch, strerror(errno));
		if (dni)
			ntfs_inode_close(dni);
		return 1;
	}
	set_hidden_system(dni);
	u64 keep_mref = dni->mft_no, dir_mref = sni->mft_no;
	ntfs_inode_close(dni);
	ntfs_inode_close(sni);

	char *buf = malloc(chunk);
	struct filler *fill = NULL;
	int nfill = 0, cap = 0, rc = 1;
	if (!buf)
		goto out;
	memset(buf, 0xa5, chunk);
	long size = chunk;
	for (;;) {
		if (nfill == cap) {
			cap = cap ? 2 * cap : 1024;
			struct filler *grown = realloc(fill, cap * sizeof(*fill));
			if (!grown)
				goto out;
			fill = grown;
		}
		char name[32];
		snprintf(name, sizeof(name), "fill-%06d", nfill);
		ntfschar *uname = NULL;
		int ulen = ntfs_mbstoucs(name, &uname);
		ntfs_inode *d = ntfs_inode_open(vol, dir_mref);
		ntfs_inode *ni = d && ulen > 0 ? ntfs_create(d, const_cpu_to_le32(0), uname, (u8)ulen, S_IFREG) : NULL;
		free(uname);
		if (!ni) {
			if (d)
				ntfs_inode_close(d);
			break; /* no room for another MFT record: the clusters left are checked below */
		}
		ntfs_attr *na = ntfs_attr_open(ni, AT_DATA, AT_UNNAMED, 0);
		s64 wrote = na ? ntfs_attr_pwrite(na, 0, size, buf) : -1;
		struct filler *f = &fill[nfill];
		memset(f, 0, sizeof(*f));
		f->mref = ni->mft_no;
		if (wrote > 0 && wrote < size)
			ntfs_attr_truncate(na, wrote);
		if (na && wrote > 0 && take_runs(na, f)) {
			fprintf(stderr, "ntfs-tool: cannot read the runs of %s/%s: %s\n", dir, name, strerror(errno));
			goto out;
		}
		if (na)
			ntfs_attr_close(na);
		ntfs_inode_close_in_dir(ni, d);
		ntfs_inode_close(d);
		nfill++;
		if (wrote != size) {
			if (size == vol->cluster_size)
				break; /* not one cluster more */
			size = vol->cluster_size;
		}
	}
	/* Which fillers hold a cluster of a range, and is every such cluster held by one? */
	char *keep = calloc(nfill ? nfill : 1, 1);
	if (!keep)
		goto out;
	int uncovered = 0;
	for (int r = 0; r < nranges; r++) {
		for (LCN c = first[r]; c < first[r] + count[r]; c++) {
			int held = 0;
			for (int i = 0; i < nfill && !held; i++)
				for (int k = 0; k < fill[i].nruns; k++)
					if (c >= fill[i].lcn[k] && c < fill[i].lcn[k] + fill[i].len[k]) {
						keep[i] = 1;
						held = 1;
						break;
					}
			if (!held) {
				if (!uncovered++)
					fprintf(stderr, "ntfs-tool: clusters of the ranges that belong to something else (see ntfscluster -c):");
				fprintf(stderr, " %lld", (long long)c);
			}
		}
	}
	if (uncovered) {
		fprintf(stderr, "\n");
		free(keep);
		goto out;
	}
	for (int i = 0; i < nfill; i++) {
		ntfs_inode *ni = ntfs_inode_open(vol, fill[i].mref);
		if (!ni)
			goto fail;
		if (keep[i]) {
			/* hidden and system first (synced into the scratch folder's entry), then a
			 * second name in DIR, which copies them; the scratch name goes below */
			set_hidden_system(ni);
			if (ntfs_inode_close(ni))
				goto fail;
			char kname[48];
			snprintf(kname, sizeof(kname), "reserved-%lld", (long long)fill[i].lcn[0]);
			ntfschar *ukname = NULL;
			int klen = ntfs_mbstoucs(kname, &ukname);
			ni = ntfs_inode_open(vol, fill[i].mref);
			ntfs_inode *k = ni ? ntfs_inode_open(vol, keep_mref) : NULL;
			int bad = !k || klen <= 0 || ntfs_link(ni, k, ukname, (u8)klen);
			free(ukname);
			if (k && ntfs_inode_close(k))
				bad = 1;
			if (bad) {
				if (ni)
					ntfs_inode_close(ni);
				goto fail;
			}
		}
		char name[32];
		snprintf(name, sizeof(name), "fill-%06d", i);
		ntfschar *uname = NULL;
		int ulen = ntfs_mbstoucs(name, &uname);
		ntfs_inode *d = ntfs_inode_open(vol, dir_mref);
		/* ntfs_delete closes both inodes, whatever it returns */
		if (!d || ulen <= 0 || ntfs_delete(vol, NULL, ni, d, uname, (u8)ulen)) {
			free(uname);
			goto fail;
		}
		free(uname);
	}
	{
		ntfschar *uname = NULL;
		int ulen = ntfs_mbstoucs(scratch, &uname);
		ntfs_inode *ni = ntfs_inode_open(vol, dir_mref);
		ntfs_inode *root = ni ? ntfs_inode_open(vol, FILE_root) : NULL;
		if (!root || ulen <= 0 || ntfs_delete(vol, NULL, ni, root, uname, (u8)ulen)) {
			if (ni && !root)
				ntfs_inode_close(ni);
			free(uname);
			goto fail;
		}
		free(uname);
	}
	free(keep);
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "ntfs-tool: cannot keep or delete the fillers in %s: %s\n", dir, strerror(errno));
	free(keep);
out:
	for (int i = 0; i < nfill; i++) {
		free(fill[i].lcn);
		free(fill[i].len);
	}
	free(fill);
	free(buf);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: ntfs-tool IMAGE mkdir DIR... | write-fragmented DEST SRC FILLER CHUNK | set-flags HEX | reserve DIR CHUNK FIRST+COUNT...\n");
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
	} else if (!strcmp(argv[2], "reserve") && argc >= 6) {
		long chunk = strtol(argv[4], NULL, 0);
		rc = chunk >= vol->cluster_size && chunk % vol->cluster_size == 0 ? cmd_reserve(vol, argv[3], chunk, argc - 5, argv + 5) : 2;
		if (rc == 2)
			fprintf(stderr, "ntfs-tool: reserve: CHUNK must be a multiple of the cluster size (%u)\n", vol->cluster_size);
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
