/*
 * kvserver.c - a key-value store speaking the Redis protocol (RESP) over the livemig-ring
 * device: the guest that shows a service keeping its clients across a live migration.
 *
 * Boot arguments: buckets=N sets the initial size of the key table (default 4096; a power of
 * two at least 16 is used). Unknown arguments are refused by the host (guests/args.py).
 *
 * It runs on vCPU 0 (the others park). Requests arrive as chains in the request ring
 * (ring.h): each chain holds whole RESP commands of one client connection, so the parser keeps
 * no state between chains. Replies go to a small output buffer that is flushed into response
 * slots tagged with the same connection id. When no request is ready the guest waits on
 * RING_WAIT_PORT, which is also where the host picks the responses up.
 *
 * Data: chained hash tables ("dicts") over the whole heap (block 0 from heap_start to
 * heap_end), with a power-of-two size-class allocator (free lists, no coalescing). The key
 * space is one dict; a key holds a string, or a pointer to a list (doubly linked nodes), a set
 * or a hash (a dict of its own) or a sorted set (a dict member -> node plus a skip list ordered
 * by score, then member). Everything the server knows lives in guest RAM and registers, so any
 * instruction boundary is a consistent migration point.
 *
 * Sorted-set scores are kept as exact canonical decimals (no binary floating point: the guest
 * runtime has no float printing, and an exact decimal compares and prints without rounding):
 * "1.50" is stored and returned as "1.5", "1e3" as "1000", inf and -inf as such. A score with
 * more than 17 significant digits or more than SCORE_MAX characters is refused with an error
 * that says so, rather than rounded.
 *
 * Commands: strings PING ECHO SET GET DEL EXISTS TYPE INCR DBSIZE MSET MGET; lists LPUSH RPUSH
 * LPOP RPOP LLEN LINDEX LRANGE; sets SADD SREM SPOP SCARD SISMEMBER SMEMBERS; hashes HSET HMSET
 * HGET HMGET HDEL HLEN HEXISTS HGETALL; sorted sets ZADD (NX XX CH) ZPOPMIN ZCARD ZSCORE ZRANGE
 * (WITHSCORES) ZREM; FLUSHALL FLUSHDB SELECT QUIT INFO CLIENT, and the CONFIG GET / COMMAND
 * replies redis-benchmark and redis-cli ask for. That is redis-benchmark's default test set.
 */
#include "livemig.h"
#include "ring.h"

#define MAX_ARGS 4096
#define CHAIN_MAX (RING_SLOTS * RING_PAYLOAD)
#define OUT_CAP (64 * 1024)
#define NCLASSES 24

/* ---- allocator: size classes 16 << k, bump allocation and free lists ---- */

static u8 *heap_cur, *heap_lim;
static void *free_list[NCLASSES];

static int size_class(u64 n)
{
	int k = 0;
	while (((u64)16 << k) < n)
		k++;
	return k;
}

static void *alloc_class(int k)
{
	if (k >= NCLASSES)
		return 0;
	void *p = free_list[k];
	if (p) {
		free_list[k] = *(void **)p;
		return p;
	}
	u64 size = (u64)16 << k;
	if ((u64)(heap_lim - heap_cur) < size)
		return 0;
	p = heap_cur;
	heap_cur += size;
	return p;
}

static void release(void *p, int k)
{
	*(void **)p = free_list[k];
	free_list[k] = p;
}

static void *alloc_bytes(u64 n) { return alloc_class(size_class(n)); }
static void release_bytes(void *p, u64 n) { release(p, size_class(n)); }

/* xorshift64*: SPOP's choice and skip-list levels (state in RAM: it migrates too) */
static u64 rng_state = 0x9E3779B97F4A7C15UL;

static u64 rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DUL;
}

/* ---- dict: a chained hash table of entries (key bytes, value bytes, type) ---- */

enum { T_STRING, T_LIST, T_SET, T_HASH, T_ZSET };

struct entry {
	struct entry *next;
	u64 hash;
	u32 klen;
	u32 vlen;
	u32 cls;
	u32 type;
	u8 data[]; /* key, then value */
};

struct dict {
	struct entry **table;
	u64 mask;
	u64 n;
	u64 cls;
};

#define VAL(e) ((e)->data + (e)->klen)

static void *ptr_of(struct entry *e)
{
	void *p;
	memcpy(&p, VAL(e), sizeof(p));
	return p;
}

static u64 hash_bytes(const u8 *p, u64 n)
{
	u64 h = 0xcbf29ce484222325UL; /* FNV-1a, then a final mix so the low bits spread */
	for (u64 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3UL;
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdUL;
	h ^= h >> 33;
	return h;
}

static int dict_init(struct dict *d, u64 buckets)
{
	u64 n = 16;
	while (n < buckets)
		n <<= 1;
	d->cls = (u64)size_class(n * sizeof(void *));
	d->table = alloc_class((int)d->cls);
	if (!d->table)
		return -1;
	memset(d->table, 0, n * sizeof(void *));
	d->mask = n - 1;
	d->n = 0;
	return 0;
}

static void dict_grow(struct dict *d)
{
	u64 n = (d->mask + 1) * 2;
	int cls = size_class(n * sizeof(void *));
	struct entry **t = alloc_class(cls);
	if (!t)
		return; /* out of memory: keep the longer chains */
	memset(t, 0, n * sizeof(void *));
	for (u64 i = 0; i <= d->mask; i++) {
		struct entry *e = d->table[i], *next;
		for (; e; e = next) {
			next = e->next;
			e->next = t[e->hash & (n - 1)];
			t[e->hash & (n - 1)] = e;
		}
	}
	release(d->table, (int)d->cls);
	d->table = t;
	d->cls = (u64)cls;
	d->mask = n - 1;
}

/* The link that points at the entry for key (or at the end of its chain). */
static struct entry **dict_link(struct dict *d, const u8 *key, u64 klen, u64 h)
{
	struct entry **link = &d->table[h & d->mask];
	for (; *link; link = &(*link)->next) {
		struct entry *e = *link;
		if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0)
			break;
	}
	return link;
}

static struct entry *dict_find(struct dict *d, const u8 *key, u64 klen)
{
	return *dict_link(d, key, klen, hash_bytes(key, klen));
}

/* Store key = val with type; the entry (it may have moved), or 0 when the heap is full.
 * An entry of another type is replaced as it is: its owner frees what it pointed to first. */
static struct entry *dict_store(struct dict *d, const u8 *key, u64 klen, const u8 *val, u64 vlen,
				u32 type)
{
	u64 h = hash_bytes(key, klen);
	struct entry **link = dict_link(d, key, klen, h);
	struct entry *old = *link;
	u64 need = sizeof(struct entry) + klen + vlen;
	if (old && need <= ((u64)16 << old->cls)) {
		memcpy(old->data + klen, val, vlen);
		old->vlen = (u32)vlen;
		old->type = type;
		return old;
	}
	int cls = size_class(need);
	struct entry *e = alloc_class(cls);
	if (!e)
		return 0;
	e->hash = h;
	e->klen = (u32)klen;
	e->vlen = (u32)vlen;
	e->cls = (u32)cls;
	e->type = type;
	memcpy(e->data, key, klen);
	memcpy(e->data + klen, val, vlen);
	if (old) {
		e->next = old->next;
		*link = e;
		release(old, (int)old->cls);
	} else {
		e->next = d->table[h & d->mask];
		d->table[h & d->mask] = e;
		if (++d->n > d->mask + 1)
			dict_grow(d);
	}
	return e;
}

/* Remove key's entry and return it (the caller releases it), or 0. */
static struct entry *dict_unlink(struct dict *d, const u8 *key, u64 klen)
{
	struct entry **link = dict_link(d, key, klen, hash_bytes(key, klen));
	struct entry *e = *link;
	if (e) {
		*link = e->next;
		d->n--;
	}
	return e;
}

static int dict_delete(struct dict *d, const u8 *key, u64 klen)
{
	struct entry *e = dict_unlink(d, key, klen);
	if (e)
		release(e, (int)e->cls);
	return e != 0;
}

/* A random entry (SPOP): a random non-empty bucket, a random place in its chain. */
static struct entry *dict_random(struct dict *d)
{
	if (!d->n)
		return 0;
	struct entry *e;
	do
		e = d->table[rnd() & d->mask];
	while (!e);
	u64 len = 0;
	for (struct entry *x = e; x; x = x->next)
		len++;
	for (u64 k = rnd() % len; k; k--)
		e = e->next;
	return e;
}

static void dict_clear(struct dict *d, void (*drop)(struct entry *))
{
	for (u64 i = 0; i <= d->mask; i++) {
		struct entry *e = d->table[i], *next;
		for (; e; e = next) {
			next = e->next;
			if (drop)
				drop(e);
			release(e, (int)e->cls);
		}
		d->table[i] = 0;
	}
	d->n = 0;
}

/* ---- containers ---- */

struct lnode {
	struct lnode *prev, *next;
	u64 len;
	u8 data[];
};

struct list {
	struct lnode *head, *tail;
	u64 n;
};

#define ZMAX 24
#define SCORE_MAX 48

struct znode {
	u32 slen; /* score text, then member, after next[levels] */
	u32 mlen;
	u32 levels;
	u32 pad;
	struct znode *next[];
};

struct zset {
	struct dict members; /* member -> struct znode * */
	struct znode *head;  /* ZMAX levels, no score or member */
	u64 level;
};

#define ZNODE_SIZE(levels, sl, ml) (sizeof(struct znode) + (u64)(levels) * 8 + (sl) + (ml))
#define ZSCORE(z) ((u8 *)&(z)->next[(z)->levels])
#define ZMEMBER(z) (ZSCORE(z) + (z)->slen)

static struct dict db;

static void znode_release(struct znode *z) { release_bytes(z, ZNODE_SIZE(z->levels, z->slen, z->mlen)); }

static void *new_container(u32 type)
{
	if (type == T_LIST) {
		struct list *l = alloc_bytes(sizeof(*l));
		if (l)
			l->head = l->tail = 0, l->n = 0;
		return l;
	}
	if (type == T_SET || type == T_HASH) {
		struct dict *d = alloc_bytes(sizeof(*d));
		if (d && dict_init(d, 16) < 0) {
			release_bytes(d, sizeof(*d));
			return 0;
		}
		return d;
	}
	struct zset *z = alloc_bytes(sizeof(*z));
	if (!z)
		return 0;
	z->head = alloc_bytes(ZNODE_SIZE(ZMAX, 0, 0));
	if (!z->head || dict_init(&z->members, 16) < 0) {
		if (z->head)
			release_bytes(z->head, ZNODE_SIZE(ZMAX, 0, 0));
		release_bytes(z, sizeof(*z));
		return 0;
	}
	memset(z->head, 0, ZNODE_SIZE(ZMAX, 0, 0));
	z->head->levels = ZMAX;
	z->level = 1;
	return z;
}

static void free_container(u32 type, void *c)
{
	if (type == T_LIST) {
		struct list *l = c;
		for (struct lnode *x = l->head, *next; x; x = next) {
			next = x->next;
			release_bytes(x, sizeof(*x) + x->len);
		}
		release_bytes(l, sizeof(*l));
	} else if (type == T_SET || type == T_HASH) {
		struct dict *d = c;
		dict_clear(d, 0);
		release(d->table, (int)d->cls);
		release_bytes(d, sizeof(*d));
	} else if (type == T_ZSET) {
		struct zset *z = c;
		for (struct znode *x = z->head->next[0], *next; x; x = next) {
			next = x->next[0];
			znode_release(x);
		}
		dict_clear(&z->members, 0);
		release(z->members.table, (int)z->members.cls);
		release_bytes(z->head, ZNODE_SIZE(ZMAX, 0, 0));
		release_bytes(z, sizeof(*z));
	}
}

static void drop_value(struct entry *e)
{
	if (e->type != T_STRING)
		free_container(e->type, ptr_of(e));
}

static int del_key(const u8 *key, u64 klen)
{
	struct entry *e = dict_unlink(&db, key, klen);
	if (!e)
		return 0;
	drop_value(e);
	release(e, (int)e->cls);
	return 1;
}

/* key = a string value; -1 when the heap is full */
static int set_string(const u8 *key, u64 klen, const u8 *val, u64 vlen)
{
	struct entry *e = dict_find(&db, key, klen);
	if (e && e->type != T_STRING)
		del_key(key, klen);
	return dict_store(&db, key, klen, val, vlen, T_STRING) ? 0 : -1;
}

/* ---- sorted-set scores: exact canonical decimals (see the top of the file) ---- */

static int lower(u8 c) { return c | 0x20; }

static int word_is(const u8 *p, u64 n, const char *w)
{
	u64 k = strlen(w);
	if (n != k)
		return 0;
	for (u64 i = 0; i < k; i++)
		if (lower(p[i]) != w[i])
			return 0;
	return 1;
}

/* The canonical text of a score in out (SCORE_MAX bytes); its length, or 0 when p is not a
 * number or one this server cannot keep exactly. */
static u32 canon_score(const u8 *p, u64 n, char *out)
{
	u64 i = 0;
	int neg = 0;
	if (n > 64)
		return 0;
	if (i < n && (p[i] == '+' || p[i] == '-'))
		neg = p[i++] == '-';
	if (word_is(p + i, n - i, "inf") || word_is(p + i, n - i, "infinity")) {
		memcpy(out, neg ? "-inf" : "inf", neg ? 4 : 3);
		return neg ? 4 : 3;
	}
	char m[64];
	u64 ml = 0, ndig = 0;
	i64 pos = 0; /* the decimal point sits after pos digits of m */
	for (; i < n && p[i] >= '0' && p[i] <= '9'; i++, ndig++) {
		if (ml == 0 && p[i] == '0') /* leading zeros carry no digit */
			continue;
		m[ml++] = (char)p[i];
		pos++;
	}
	if (i < n && p[i] == '.') {
		for (i++; i < n && p[i] >= '0' && p[i] <= '9'; i++, ndig++) {
			if (ml == 0 && p[i] == '0') {
				pos--;
				continue;
			}
			m[ml++] = (char)p[i];
		}
	}
	if (!ndig)
		return 0;
	if (i < n && (p[i] == 'e' || p[i] == 'E')) {
		int eneg = 0;
		i64 e = 0;
		u64 edig = 0;
		i++;
		if (i < n && (p[i] == '+' || p[i] == '-'))
			eneg = p[i++] == '-';
		for (; i < n && p[i] >= '0' && p[i] <= '9' && edig < 4; i++, edig++)
			e = e * 10 + (p[i] - '0');
		if (!edig)
			return 0;
		pos += eneg ? -e : e;
	}
	if (i != n)
		return 0;
	while (ml && m[ml - 1] == '0')
		ml--;
	if (!ml) {
		out[0] = '0';
		return 1;
	}
	if (ml > 17)
		return 0;
	u64 len = (u64)neg + (pos <= 0 ? 2 + (u64)(-pos) + ml : pos >= (i64)ml ? (u64)pos : ml + 1);
	if (len > SCORE_MAX)
		return 0;
	u64 o = 0;
	if (neg)
		out[o++] = '-';
	if (pos <= 0) {
		out[o++] = '0';
		out[o++] = '.';
		for (i64 k = 0; k < -pos; k++)
			out[o++] = '0';
		memcpy(out + o, m, ml);
		o += ml;
	} else if (pos >= (i64)ml) {
		memcpy(out + o, m, ml);
		o += ml;
		for (i64 k = (i64)ml; k < pos; k++)
			out[o++] = '0';
	} else {
		memcpy(out + o, m, (u64)pos);
		o += (u64)pos;
		out[o++] = '.';
		memcpy(out + o, m + pos, ml - (u64)pos);
		o += ml - (u64)pos;
	}
	return (u32)o;
}

/* -2 for -inf, -1 negative, 0 zero, 1 positive, 2 inf (of a canonical score) */
static int score_sign(const u8 *s, u32 n)
{
	if (n == 4 && s[0] == '-' && s[1] == 'i')
		return -2;
	if (n == 3 && s[0] == 'i')
		return 2;
	if (s[0] == '-')
		return -1;
	return n == 1 && s[0] == '0' ? 0 : 1;
}

static u32 int_part(const u8 *s, u32 n)
{
	u32 k = 0;
	while (k < n && s[k] != '.')
		k++;
	return k;
}

static int cmp_bytes(const u8 *a, u64 al, const u8 *b, u64 bl)
{
	int c = memcmp(a, b, al < bl ? al : bl);
	if (c)
		return c;
	return al < bl ? -1 : al > bl;
}

/* Two canonical scores, numerically: no leading zeros, so a longer integer part is larger,
 * and no trailing zeros, so a fraction that is a prefix of another is smaller. */
static int cmp_score(const u8 *a, u32 al, const u8 *b, u32 bl)
{
	int sa = score_sign(a, al), sb = score_sign(b, bl);
	if (sa != sb)
		return sa < sb ? -1 : 1;
	if (sa == 0 || sa == 2 || sa == -2)
		return 0;
	int neg = sa < 0;
	a += neg, al -= neg, b += neg, bl -= neg;
	u32 ia = int_part(a, al), ib = int_part(b, bl);
	int c;
	if (ia != ib)
		c = ia < ib ? -1 : 1;
	else if ((c = memcmp(a, b, ia)) == 0)
		c = cmp_bytes(a + ia, al - ia, b + ib, bl - ib);
	return neg ? -c : c;
}

/* ---- skip list of a sorted set (order: score, then member bytes) ---- */

static int zcmp(struct znode *x, const u8 *s, u32 sl, const u8 *m, u64 ml)
{
	int c = cmp_score(ZSCORE(x), x->slen, s, sl);
	return c ? c : cmp_bytes(ZMEMBER(x), x->mlen, m, ml);
}

static struct znode *zinsert(struct zset *z, const u8 *s, u32 sl, const u8 *m, u64 ml)
{
	struct znode *update[ZMAX], *x = z->head;
	for (int i = (int)z->level - 1; i >= 0; i--) {
		while (x->next[i] && zcmp(x->next[i], s, sl, m, ml) < 0)
			x = x->next[i];
		update[i] = x;
	}
	u32 levels = 1;
	while (levels < ZMAX && (rnd() & 3) == 0)
		levels++;
	struct znode *n = alloc_bytes(ZNODE_SIZE(levels, sl, ml));
	if (!n)
		return 0;
	n->slen = sl;
	n->mlen = (u32)ml;
	n->levels = levels;
	memcpy(ZSCORE(n), s, sl);
	memcpy(ZMEMBER(n), m, ml);
	for (u32 i = (u32)z->level; i < levels; i++)
		update[i] = z->head;
	if (levels > z->level)
		z->level = levels;
	for (u32 i = 0; i < levels; i++) {
		n->next[i] = update[i]->next[i];
		update[i]->next[i] = n;
	}
	return n;
}

static void zunlink(struct zset *z, struct znode *n)
{
	struct znode *x = z->head;
	for (int i = (int)z->level - 1; i >= 0; i--) {
		while (x->next[i] && x->next[i] != n &&
		       zcmp(x->next[i], ZSCORE(n), n->slen, ZMEMBER(n), n->mlen) < 0)
			x = x->next[i];
		if (x->next[i] == n)
			x->next[i] = n->next[i];
	}
	while (z->level > 1 && !z->head->next[z->level - 1])
		z->level--;
}

/* ---- the ring ---- */

static u32 req_cons, resp_prod;
static u8 *chain;   /* the request chain being served, CHAIN_MAX bytes */
static u8 *out;     /* replies not yet in the response ring, OUT_CAP bytes */
static u64 out_len;
static u64 out_conn;
static u64 served;

/* After a migration the device asks for every ring page to be read once (ring.py). */
static void touch_ring(void)
{
	for (u64 off = 0; off < RING_SIZE; off += PAGE_SIZE)
		(void)*(volatile u8 *)(RING_ADDR + off);
	outl(RING_SETUP_PORT, RING_SETUP_TOUCHED);
}

static void flush_out(void)
{
	volatile struct ring_header *hdr = RING_HEADER;
	u64 done = 0;
	while (done < out_len) {
		while ((u32)(resp_prod - hdr->resp_cons) >= RING_SLOTS) {
			if (inl(RING_SPACE_PORT) == RING_WAIT_TOUCH)
				touch_ring();
		}
		u64 n = out_len - done;
		if (n > RING_PAYLOAD)
			n = RING_PAYLOAD;
		volatile struct ring_entry *e = RING_RESP(resp_prod);
		e->conn = out_conn;
		e->len = (u32)n;
		e->flags = done + n < out_len ? RING_F_MORE : 0;
		memcpy((void *)e->data, out + done, n);
		done += n;
		barrier();
		hdr->resp_prod = ++resp_prod;
	}
	out_len = 0;
	/* Half full: have the host take them now rather than at the next wait. */
	if ((u32)(resp_prod - hdr->resp_cons) >= RING_SLOTS / 2)
		outl(RING_DOORBELL_PORT, 1);
}

static void out_raw(const void *p, u64 n)
{
	const u8 *s = p;
	while (n) {
		if (out_len == OUT_CAP)
			flush_out();
		u64 k = OUT_CAP - out_len;
		if (k > n)
			k = n;
		memcpy(out + out_len, s, k);
		out_len += k;
		s += k;
		n -= k;
	}
}

static void out_str(const char *s) { out_raw(s, strlen(s)); }

static void out_int(i64 v)
{
	char buf[32];
	int n = snprintf(buf, sizeof(buf), ":%ld\r\n", v);
	out_raw(buf, (u64)n);
}

static void out_bulk(const u8 *p, u64 n)
{
	char buf[32];
	int k = snprintf(buf, sizeof(buf), "$%lu\r\n", n);
	out_raw(buf, (u64)k);
	out_raw(p, n);
	out_raw("\r\n", 2);
}

static void out_array(u64 n)
{
	char buf[32];
	int k = snprintf(buf, sizeof(buf), "*%lu\r\n", n);
	out_raw(buf, (u64)k);
}

/* ---- RESP parsing ---- */

static const u8 *argv[MAX_ARGS];
static u64 argl[MAX_ARGS];

/* A decimal number ending in \r\n at p; -1 on a malformed one. */
static i64 parse_len(const u8 *buf, u64 len, u64 *pos)
{
	u64 p = *pos;
	i64 v = 0;
	int neg = 0, digits = 0;
	if (p < len && buf[p] == '-') {
		neg = 1;
		p++;
	}
	for (; p < len && buf[p] >= '0' && buf[p] <= '9'; p++, digits++)
		v = v * 10 + (buf[p] - '0');
	if (!digits || p + 1 >= len || buf[p] != '\r' || buf[p + 1] != '\n')
		return -2;
	*pos = p + 2;
	return neg ? -v : v;
}

/* One command at *pos into argv/argl: its argc, 0 for an empty one, -1 on a protocol error. */
static int parse_command(const u8 *buf, u64 len, u64 *pos)
{
	u64 p = *pos;
	if (buf[p] == '*') {
		p++;
		i64 n = parse_len(buf, len, &p);
		if (n < -1 || n > MAX_ARGS)
			return -1;
		for (i64 i = 0; i < n; i++) {
			if (p >= len || buf[p] != '$')
				return -1;
			p++;
			i64 l = parse_len(buf, len, &p);
			if (l < 0 || (u64)l + 2 > len - p || buf[p + l] != '\r' || buf[p + l + 1] != '\n')
				return -1;
			argv[i] = buf + p;
			argl[i] = (u64)l;
			p += (u64)l + 2;
		}
		*pos = p;
		return n < 0 ? 0 : (int)n;
	}
	/* Inline command: words separated by spaces, up to \n. */
	u64 end = p;
	while (end < len && buf[end] != '\n')
		end++;
	if (end == len)
		return -1;
	*pos = end + 1;
	if (end > p && buf[end - 1] == '\r')
		end--;
	int argc = 0;
	while (p < end) {
		while (p < end && buf[p] == ' ')
			p++;
		if (p == end)
			break;
		if (argc == MAX_ARGS)
			return -1;
		argv[argc] = buf + p;
		while (p < end && buf[p] != ' ')
			p++;
		argl[argc] = (u64)(buf + p - argv[argc]);
		argc++;
	}
	return argc;
}

static int is(int i, const char *name)
{
	u64 n = strlen(name);
	if (argl[i] != n)
		return 0;
	for (u64 k = 0; k < n; k++)
		if ((argv[i][k] | 0x20) != name[k])
			return 0;
	return 1;
}

static void wrong_args(void)
{
	char buf[96];
	u64 n = argl[0] < 32 ? argl[0] : 32;
	char name[33];
	for (u64 k = 0; k < n; k++)
		name[k] = (char)(argv[0][k] | 0x20);
	name[n] = '\0';
	snprintf(buf, sizeof(buf), "-ERR wrong number of arguments for '%s' command\r\n", name);
	out_str(buf);
}

static const char OOM[] = "-OOM command not allowed: the guest heap is full\r\n";
static const char WRONGTYPE[] =
	"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
static const char NOT_INT[] = "-ERR value is not an integer or out of range\r\n";
static const char SYNTAX[] = "-ERR syntax error\r\n";

/* A whole decimal int64 (Redis' rule for INCR); 0 if it is not one. */
static int to_i64(const u8 *p, u64 n, i64 *v)
{
	if (n == 0 || n > 20)
		return 0;
	u64 i = 0;
	int neg = 0;
	if (p[0] == '-') {
		neg = 1;
		i = 1;
		if (n == 1)
			return 0;
	}
	u64 x = 0;
	for (; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return 0;
		u64 y = x * 10 + (u64)(p[i] - '0');
		if (y / 10 != x)
			return 0;
		x = y;
	}
	if (x > (u64)0x7fffffffffffffffUL + (u64)neg)
		return 0;
	*v = neg ? (i64)(0 - x) : (i64)x;
	return 1;
}

/* argv[i] as an int64, or an error reply and 0 */
static int arg_int(int i, i64 *v)
{
	if (to_i64(argv[i], argl[i], v))
		return 1;
	out_str(NOT_INT);
	return 0;
}

/* The optional count of LPOP/RPOP/SPOP/ZPOPMIN at argv[2]: 1 with *count set (-1: none given),
 * 0 after an error reply. */
static int pop_count(int argc, i64 *count)
{
	*count = -1;
	if (argc < 3)
		return 1;
	if (argc > 3) {
		wrong_args();
		return 0;
	}
	if (!to_i64(argv[2], argl[2], count) || *count < 0) {
		out_str("-ERR value is out of range, must be positive\r\n");
		return 0;
	}
	return 1;
}

/* The container of the key argv[i] if it has type t (0 if there is none and !create: a new
 * empty one if create). *err is set after an error reply (another type, heap full). */
static void *container(int i, u32 t, int create, int *err)
{
	struct entry *e = dict_find(&db, argv[i], argl[i]);
	*err = 0;
	if (e) {
		if (e->type == t)
			return ptr_of(e);
		out_str(WRONGTYPE);
		*err = 1;
		return 0;
	}
	if (!create)
		return 0;
	void *c = new_container(t);
	if (!c || !dict_store(&db, argv[i], argl[i], (const u8 *)&c, sizeof(c), t)) {
		if (c)
			free_container(t, c);
		out_str(OOM);
		*err = 1;
		return 0;
	}
	return c;
}

/* Redis' LRANGE/ZRANGE index rules; 0 when the range is empty. */
static int clamp_range(i64 *start, i64 *stop, u64 n)
{
	if (*start < 0)
		*start += (i64)n;
	if (*stop < 0)
		*stop += (i64)n;
	if (*start < 0)
		*start = 0;
	if (*start > *stop || *start >= (i64)n)
		return 0;
	if (*stop >= (i64)n)
		*stop = (i64)n - 1;
	return 1;
}

/* ---- lists ---- */

static void cmd_push(int argc, int left)
{
	if (argc < 3)
		return wrong_args();
	int err;
	struct list *l = container(1, T_LIST, 1, &err);
	if (err)
		return;
	for (int i = 2; i < argc; i++) {
		struct lnode *x = alloc_bytes(sizeof(*x) + argl[i]);
		if (!x) {
			if (!l->n)
				del_key(argv[1], argl[1]);
			return out_str(OOM);
		}
		x->len = argl[i];
		memcpy(x->data, argv[i], argl[i]);
		if (left) {
			x->prev = 0;
			x->next = l->head;
			if (l->head)
				l->head->prev = x;
			else
				l->tail = x;
			l->head = x;
		} else {
			x->next = 0;
			x->prev = l->tail;
			if (l->tail)
				l->tail->next = x;
			else
				l->head = x;
			l->tail = x;
		}
		l->n++;
	}
	out_int((i64)l->n);
}

static void cmd_pop(int argc, int left)
{
	if (argc < 2)
		return wrong_args();
	i64 count;
	int err;
	if (!pop_count(argc, &count))
		return;
	struct list *l = container(1, T_LIST, 0, &err);
	if (err)
		return;
	if (!l)
		return out_str(count < 0 ? "$-1\r\n" : "*-1\r\n");
	u64 k = count < 0 ? 1 : (u64)count < l->n ? (u64)count : l->n;
	if (count >= 0)
		out_array(k);
	for (; k; k--) {
		struct lnode *x = left ? l->head : l->tail;
		if (left) {
			l->head = x->next;
			if (l->head)
				l->head->prev = 0;
			else
				l->tail = 0;
		} else {
			l->tail = x->prev;
			if (l->tail)
				l->tail->next = 0;
			else
				l->head = 0;
		}
		l->n--;
		out_bulk(x->data, x->len);
		release_bytes(x, sizeof(*x) + x->len);
	}
	if (!l->n)
		del_key(argv[1], argl[1]);
}

static void cmd_lrange(int argc)
{
	i64 start, stop;
	int err;
	if (argc != 4)
		return wrong_args();
	if (!arg_int(2, &start) || !arg_int(3, &stop))
		return;
	struct list *l = container(1, T_LIST, 0, &err);
	if (err)
		return;
	if (!l || !clamp_range(&start, &stop, l->n))
		return out_str("*0\r\n");
	out_array((u64)(stop - start + 1));
	struct lnode *x = l->head;
	for (i64 k = 0; k < start; k++)
		x = x->next;
	for (i64 k = start; k <= stop; k++, x = x->next)
		out_bulk(x->data, x->len);
}

static void cmd_lindex(int argc)
{
	i64 idx;
	int err;
	if (argc != 3)
		return wrong_args();
	if (!arg_int(2, &idx))
		return;
	struct list *l = container(1, T_LIST, 0, &err);
	if (err)
		return;
	if (l && idx < 0)
		idx += (i64)l->n;
	if (!l || idx < 0 || idx >= (i64)l->n)
		return out_str("$-1\r\n");
	struct lnode *x = l->head;
	for (; idx; idx--)
		x = x->next;
	out_bulk(x->data, x->len);
}

/* ---- sets and hashes (a dict each) ---- */

static void cmd_sadd(int argc)
{
	if (argc < 3)
		return wrong_args();
	int err;
	struct dict *d = container(1, T_SET, 1, &err);
	if (err)
		return;
	i64 added = 0;
	for (int i = 2; i < argc; i++) {
		if (dict_find(d, argv[i], argl[i]))
			continue;
		if (!dict_store(d, argv[i], argl[i], 0, 0, T_STRING)) {
			if (!d->n)
				del_key(argv[1], argl[1]);
			return out_str(OOM);
		}
		added++;
	}
	out_int(added);
}

/* SREM and HDEL: remove members (fields), drop the key once empty */
static void cmd_remove(int argc, u32 t)
{
	if (argc < 3)
		return wrong_args();
	int err;
	struct dict *d = container(1, t, 0, &err);
	if (err)
		return;
	i64 n = 0;
	for (int i = 2; d && i < argc; i++)
		n += dict_delete(d, argv[i], argl[i]);
	if (d && !d->n)
		del_key(argv[1], argl[1]);
	out_int(n);
}

static void cmd_spop(int argc)
{
	if (argc < 2)
		return wrong_args();
	i64 count;
	int err;
	if (!pop_count(argc, &count))
		return;
	struct dict *d = container(1, T_SET, 0, &err);
	if (err)
		return;
	if (!d)
		return out_str(count < 0 ? "$-1\r\n" : "*0\r\n");
	u64 k = count < 0 ? 1 : (u64)count < d->n ? (u64)count : d->n;
	if (count >= 0)
		out_array(k);
	for (; k; k--) {
		struct entry *e = dict_random(d);
		out_bulk(e->data, e->klen);
		dict_delete(d, e->data, e->klen);
	}
	if (!d->n)
		del_key(argv[1], argl[1]);
}

static void cmd_smembers(int argc, int what)
{
	int err;
	if (argc != (what == 2 ? 3 : 2))
		return wrong_args();
	struct dict *d = container(1, T_SET, 0, &err);
	if (err)
		return;
	if (what == 1) /* SCARD */
		return out_int(d ? (i64)d->n : 0);
	if (what == 2) /* SISMEMBER */
		return out_int(d && dict_find(d, argv[2], argl[2]));
	out_array(d ? d->n : 0);
	for (u64 i = 0; d && i <= d->mask; i++)
		for (struct entry *e = d->table[i]; e; e = e->next)
			out_bulk(e->data, e->klen);
}

static void cmd_hset(int argc, int hmset)
{
	if (argc < 4 || argc % 2)
		return wrong_args();
	int err;
	struct dict *d = container(1, T_HASH, 1, &err);
	if (err)
		return;
	i64 added = 0;
	for (int i = 2; i < argc; i += 2) {
		int fresh = !dict_find(d, argv[i], argl[i]);
		if (!dict_store(d, argv[i], argl[i], argv[i + 1], argl[i + 1], T_STRING)) {
			if (!d->n)
				del_key(argv[1], argl[1]);
			return out_str(OOM);
		}
		added += fresh;
	}
	if (hmset)
		out_str("+OK\r\n");
	else
		out_int(added);
}

static void cmd_hget(int argc, int many)
{
	if (many ? argc < 3 : argc != 3)
		return wrong_args();
	int err;
	struct dict *d = container(1, T_HASH, 0, &err);
	if (err)
		return;
	if (many)
		out_array((u64)argc - 2);
	for (int i = 2; i < argc; i++) {
		struct entry *e = d ? dict_find(d, argv[i], argl[i]) : 0;
		if (e)
			out_bulk(VAL(e), e->vlen);
		else
			out_str("$-1\r\n");
	}
}

static void cmd_hinfo(int argc, int what)
{
	int err;
	if (argc != (what == 2 ? 3 : 2))
		return wrong_args();
	struct dict *d = container(1, T_HASH, 0, &err);
	if (err)
		return;
	if (what == 1) /* HLEN */
		return out_int(d ? (i64)d->n : 0);
	if (what == 2) /* HEXISTS */
		return out_int(d && dict_find(d, argv[2], argl[2]));
	out_array(d ? 2 * d->n : 0); /* HGETALL */
	for (u64 i = 0; d && i <= d->mask; i++)
		for (struct entry *e = d->table[i]; e; e = e->next) {
			out_bulk(e->data, e->klen);
			out_bulk(VAL(e), e->vlen);
		}
}

/* ---- sorted sets ---- */

static void cmd_zadd(int argc)
{
	int nx = 0, xx = 0, ch = 0, i = 2;
	for (; i < argc; i++) {
		if (is(i, "nx"))
			nx = 1;
		else if (is(i, "xx"))
			xx = 1;
		else if (is(i, "ch"))
			ch = 1;
		else if (is(i, "gt") || is(i, "lt") || is(i, "incr"))
			return out_str("-ERR kvserver: ZADD GT, LT and INCR are not implemented\r\n");
		else
			break;
	}
	if (argc - i < 2 || (argc - i) % 2)
		return i == 2 ? wrong_args() : out_str(SYNTAX);
	if (nx && xx)
		return out_str("-ERR XX and NX options at the same time are not compatible\r\n");
	static char scores[MAX_ARGS / 2][SCORE_MAX];
	static u32 slens[MAX_ARGS / 2];
	for (int k = i; k < argc; k += 2) {
		u32 n = canon_score(argv[k], argl[k], scores[(k - i) / 2]);
		if (!n)
			return out_str("-ERR value is not a valid float (kvserver keeps scores as exact "
				       "decimals: at most 17 significant digits)\r\n");
		slens[(k - i) / 2] = n;
	}
	int err;
	struct zset *z = container(1, T_ZSET, !xx, &err);
	if (err)
		return;
	i64 added = 0, changed = 0;
	for (int k = i; z && k < argc; k += 2) {
		const u8 *s = (const u8 *)scores[(k - i) / 2], *m = argv[k + 1];
		u32 sl = slens[(k - i) / 2];
		u64 ml = argl[k + 1];
		struct entry *e = dict_find(&z->members, m, ml);
		if (e ? nx : xx)
			continue;
		struct znode *old = e ? ptr_of(e) : 0;
		if (old && cmp_score(ZSCORE(old), old->slen, s, sl) == 0 && old->slen == sl)
			continue;
		struct znode *n = zinsert(z, s, sl, m, ml);
		if (!n || !dict_store(&z->members, m, ml, (const u8 *)&n, sizeof(n), T_STRING)) {
			if (n) {
				zunlink(z, n);
				znode_release(n);
			}
			if (!z->members.n)
				del_key(argv[1], argl[1]);
			return out_str(OOM);
		}
		if (old) {
			zunlink(z, old);
			znode_release(old);
			changed++;
		} else {
			added++;
		}
	}
	out_int(ch ? added + changed : added);
}

static void out_znode(struct znode *x, int scores)
{
	out_bulk(ZMEMBER(x), x->mlen);
	if (scores)
		out_bulk(ZSCORE(x), x->slen);
}

static void cmd_zpopmin(int argc)
{
	if (argc < 2)
		return wrong_args();
	i64 count;
	int err;
	if (!pop_count(argc, &count))
		return;
	struct zset *z = container(1, T_ZSET, 0, &err);
	if (err)
		return;
	u64 n = z ? z->members.n : 0;
	u64 k = count < 0 ? (n ? 1 : 0) : (u64)count < n ? (u64)count : n;
	out_array(2 * k);
	for (; k; k--) {
		struct znode *x = z->head->next[0];
		out_znode(x, 1);
		dict_delete(&z->members, ZMEMBER(x), x->mlen);
		zunlink(z, x);
		znode_release(x);
	}
	if (z && !z->members.n)
		del_key(argv[1], argl[1]);
}

static void cmd_zrange(int argc)
{
	i64 start, stop;
	int err, scores = 0;
	if (argc < 4)
		return wrong_args();
	for (int i = 4; i < argc; i++) {
		if (is(i, "withscores"))
			scores = 1;
		else
			return out_str("-ERR kvserver: ZRANGE takes only WITHSCORES (no BYSCORE, "
				       "BYLEX, REV or LIMIT)\r\n");
	}
	if (!arg_int(2, &start) || !arg_int(3, &stop))
		return;
	struct zset *z = container(1, T_ZSET, 0, &err);
	if (err)
		return;
	if (!z || !clamp_range(&start, &stop, z->members.n))
		return out_str("*0\r\n");
	out_array((u64)(stop - start + 1) * (scores ? 2 : 1));
	struct znode *x = z->head->next[0];
	for (i64 k = 0; k < start; k++)
		x = x->next[0];
	for (i64 k = start; k <= stop; k++, x = x->next[0])
		out_znode(x, scores);
}

static void cmd_zmisc(int argc, int what)
{
	int err;
	if (what == 0 ? argc != 2 : what == 1 ? argc != 3 : argc < 3)
		return wrong_args();
	struct zset *z = container(1, T_ZSET, 0, &err);
	if (err)
		return;
	if (what == 0) /* ZCARD */
		return out_int(z ? (i64)z->members.n : 0);
	if (what == 1) { /* ZSCORE */
		struct entry *e = z ? dict_find(&z->members, argv[2], argl[2]) : 0;
		if (!e)
			return out_str("$-1\r\n");
		struct znode *x = ptr_of(e);
		return out_bulk(ZSCORE(x), x->slen);
	}
	i64 n = 0; /* ZREM */
	for (int i = 2; z && i < argc; i++) {
		struct entry *e = dict_unlink(&z->members, argv[i], argl[i]);
		if (!e)
			continue;
		struct znode *x = ptr_of(e);
		release(e, (int)e->cls);
		zunlink(z, x);
		znode_release(x);
		n++;
	}
	if (z && !z->members.n)
		del_key(argv[1], argl[1]);
	out_int(n);
}

/* ---- strings and the rest ---- */

static void cmd_config(int argc)
{
	if (argc >= 3 && is(1, "get")) {
		/* redis-benchmark reads these two at start-up. */
		if (is(2, "save")) {
			out_str("*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
		} else if (is(2, "appendonly")) {
			out_str("*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
		} else {
			out_str("*0\r\n");
		}
	} else if (argc >= 2) {
		out_str("+OK\r\n");
	} else {
		wrong_args();
	}
}

static void cmd_incr(int argc)
{
	if (argc != 2)
		return wrong_args();
	struct entry *e = dict_find(&db, argv[1], argl[1]);
	i64 v = 0;
	if (e && e->type != T_STRING)
		return out_str(WRONGTYPE);
	if (e && !to_i64(VAL(e), e->vlen, &v))
		return out_str(NOT_INT);
	if (v == 0x7fffffffffffffffL)
		return out_str("-ERR increment or decrement would overflow\r\n");
	v++;
	char buf[24];
	int n = snprintf(buf, sizeof(buf), "%ld", v);
	if (set_string(argv[1], argl[1], (const u8 *)buf, (u64)n) < 0)
		return out_str(OOM);
	out_int(v);
}

static void cmd_type(int argc)
{
	static const char *const names[] = {"+string\r\n", "+list\r\n", "+set\r\n", "+hash\r\n",
					    "+zset\r\n"};
	if (argc != 2)
		return wrong_args();
	struct entry *e = dict_find(&db, argv[1], argl[1]);
	out_str(e ? names[e->type] : "+none\r\n");
}

static void execute(int argc)
{
	if (is(0, "get")) {
		if (argc != 2)
			return wrong_args();
		struct entry *e = dict_find(&db, argv[1], argl[1]);
		if (e && e->type != T_STRING)
			out_str(WRONGTYPE);
		else if (e)
			out_bulk(VAL(e), e->vlen);
		else
			out_str("$-1\r\n");
	} else if (is(0, "set")) {
		if (argc < 3)
			return wrong_args();
		if (set_string(argv[1], argl[1], argv[2], argl[2]) < 0)
			out_str(OOM);
		else
			out_str("+OK\r\n");
	} else if (is(0, "ping")) {
		if (argc == 1)
			out_str("+PONG\r\n");
		else
			out_bulk(argv[1], argl[1]);
	} else if (is(0, "del") || is(0, "exists")) {
		if (argc < 2)
			return wrong_args();
		int del = is(0, "del");
		i64 n = 0;
		for (int i = 1; i < argc; i++)
			n += del ? del_key(argv[i], argl[i]) : dict_find(&db, argv[i], argl[i]) != 0;
		out_int(n);
	} else if (is(0, "incr")) {
		cmd_incr(argc);
	} else if (is(0, "lpush") || is(0, "rpush")) {
		cmd_push(argc, is(0, "lpush"));
	} else if (is(0, "lpop") || is(0, "rpop")) {
		cmd_pop(argc, is(0, "lpop"));
	} else if (is(0, "lrange")) {
		cmd_lrange(argc);
	} else if (is(0, "llen")) {
		int err;
		if (argc != 2)
			return wrong_args();
		struct list *l = container(1, T_LIST, 0, &err);
		if (!err)
			out_int(l ? (i64)l->n : 0);
	} else if (is(0, "lindex")) {
		cmd_lindex(argc);
	} else if (is(0, "sadd")) {
		cmd_sadd(argc);
	} else if (is(0, "srem")) {
		cmd_remove(argc, T_SET);
	} else if (is(0, "spop")) {
		cmd_spop(argc);
	} else if (is(0, "smembers") || is(0, "scard") || is(0, "sismember")) {
		cmd_smembers(argc, is(0, "scard") ? 1 : is(0, "sismember") ? 2 : 0);
	} else if (is(0, "hset") || is(0, "hmset")) {
		cmd_hset(argc, is(0, "hmset"));
	} else if (is(0, "hget") || is(0, "hmget")) {
		cmd_hget(argc, is(0, "hmget"));
	} else if (is(0, "hdel")) {
		cmd_remove(argc, T_HASH);
	} else if (is(0, "hgetall") || is(0, "hlen") || is(0, "hexists")) {
		cmd_hinfo(argc, is(0, "hlen") ? 1 : is(0, "hexists") ? 2 : 0);
	} else if (is(0, "zadd")) {
		if (argc < 4)
			return wrong_args();
		cmd_zadd(argc);
	} else if (is(0, "zpopmin")) {
		cmd_zpopmin(argc);
	} else if (is(0, "zrange")) {
		cmd_zrange(argc);
	} else if (is(0, "zcard") || is(0, "zscore") || is(0, "zrem")) {
		cmd_zmisc(argc, is(0, "zcard") ? 0 : is(0, "zscore") ? 1 : 2);
	} else if (is(0, "type")) {
		cmd_type(argc);
	} else if (is(0, "dbsize")) {
		out_int((i64)db.n);
	} else if (is(0, "mset")) {
		if (argc < 3 || argc % 2 == 0)
			return wrong_args();
		for (int i = 1; i < argc; i += 2)
			if (set_string(argv[i], argl[i], argv[i + 1], argl[i + 1]) < 0)
				return out_str(OOM);
		out_str("+OK\r\n");
	} else if (is(0, "mget")) {
		if (argc < 2)
			return wrong_args();
		out_array((u64)argc - 1);
		for (int i = 1; i < argc; i++) {
			struct entry *e = dict_find(&db, argv[i], argl[i]);
			if (e && e->type == T_STRING)
				out_bulk(VAL(e), e->vlen);
			else
				out_str("$-1\r\n");
		}
	} else if (is(0, "echo")) {
		if (argc != 2)
			return wrong_args();
		out_bulk(argv[1], argl[1]);
	} else if (is(0, "config")) {
		cmd_config(argc);
	} else if (is(0, "command")) {
		if (argc >= 2 && is(1, "count"))
			out_int(0);
		else
			out_str("*0\r\n");
	} else if (is(0, "flushall") || is(0, "flushdb")) {
		dict_clear(&db, drop_value);
		out_str("+OK\r\n");
	} else if (is(0, "select") || is(0, "quit") || is(0, "client")) {
		out_str("+OK\r\n");
	} else if (is(0, "info")) {
		char buf[160];
		int n = snprintf(buf, sizeof(buf),
				 "# Server\r\nredis_version:7.0.0\r\nlivemig_guest:kvserver\r\n"
				 "# Keyspace\r\ndb0:keys=%lu,expires=0\r\n",
				 db.n);
		out_bulk((const u8 *)buf, (u64)n);
	} else {
		char buf[96];
		u64 n = argl[0] < 40 ? argl[0] : 40;
		char name[41];
		memcpy(name, argv[0], n);
		name[n] = '\0';
		for (u64 k = 0; k < n; k++)
			if (name[k] < ' ' || name[k] == '\'')
				name[k] = '?';
		snprintf(buf, sizeof(buf), "-ERR unknown command '%s'\r\n", name);
		out_str(buf);
	}
}

static void serve_chain(u64 len)
{
	u64 pos = 0;
	while (pos < len) {
		int argc = parse_command(chain, len, &pos);
		if (argc < 0) {
			/* The host frames whole commands, so this is a client speaking nonsense. */
			out_str("-ERR Protocol error: malformed RESP request\r\n");
			break;
		}
		if (argc > 0) {
			execute(argc);
			served++;
		}
	}
	flush_out();
}

int main(int cpu, const struct boot_info *bi)
{
	if (cpu != 0)
		return 0;
	heap_cur = (u8 *)bi->heap_start;
	heap_lim = (u8 *)bi->heap_end;
	chain = alloc_class(size_class(CHAIN_MAX));
	out = alloc_class(size_class(OUT_CAP));
	if (!chain || !out || dict_init(&db, arg_u64("buckets", 4096)) < 0) {
		puts("kvserver: heap too small\n");
		return 2;
	}
	volatile struct ring_header *hdr = RING_HEADER;
	hdr->req_cons = hdr->resp_prod = 0;
	hdr->magic = RING_MAGIC;
	barrier();
	outl(RING_SETUP_PORT, RING_SETUP_INIT);
	printf("kvserver: ready, %lu MiB heap\n", (u64)(heap_lim - heap_cur) >> 20);

	for (;;) {
		if (hdr->req_prod == req_cons) {
			if (inl(RING_WAIT_PORT) == RING_WAIT_TOUCH)
				touch_ring();
			continue;
		}
		barrier();
		u64 len = 0;
		u32 flags;
		do {
			volatile struct ring_entry *e = RING_REQ(req_cons);
			u32 n = e->len;
			flags = e->flags;
			out_conn = e->conn;
			if (n > RING_PAYLOAD || len + n > CHAIN_MAX) {
				printf("kvserver: bad request slot %u (len %u)\n", req_cons, n);
				return 3;
			}
			memcpy(chain + len, (const void *)e->data, n);
			len += n;
			req_cons++;
		} while (flags & RING_F_MORE);
		hdr->req_cons = req_cons;
		serve_chain(len);
	}
}
