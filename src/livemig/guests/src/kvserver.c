/*
 * kvserver.c - a key-value store speaking the Redis protocol (RESP) over the livemig-ring
 * device: the guest that shows a service keeping its clients across a live migration.
 *
 * Boot arguments: none needed (buckets=N sets the initial hash table size, default 4096).
 *
 * It runs on vCPU 0 (the others park). Requests arrive as chains in the request ring
 * (ring.h): each chain holds whole RESP commands of one client connection, so the parser keeps
 * no state between chains. Replies go to a small output buffer that is flushed into response
 * slots tagged with the same connection id. When no request is ready the guest waits on
 * RING_WAIT_PORT, which is also where the host picks the responses up.
 *
 * Data: a chained hash table over the whole heap (block 0 from heap_start to heap_end), with a
 * power-of-two size-class allocator (free lists, no coalescing: values are small and SET of a
 * same-size value reuses its entry in place). Everything the server knows lives in guest RAM
 * and registers, so any instruction boundary is a consistent migration point.
 *
 * Commands: PING ECHO SET GET DEL INCR EXISTS DBSIZE MSET MGET FLUSHALL FLUSHDB SELECT QUIT
 * INFO CLIENT, and the CONFIG GET / COMMAND replies redis-benchmark and redis-cli ask for.
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

/* ---- hash table ---- */

struct entry {
	struct entry *next;
	u64 hash;
	u32 klen;
	u32 vlen;
	u32 cls;
	u32 pad;
	u8 data[]; /* key, then value */
};

static struct entry **table;
static u64 table_mask;
static int table_cls;
static u64 nkeys;

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

static int table_init(u64 buckets)
{
	u64 n = 16;
	while (n < buckets)
		n <<= 1;
	table_cls = size_class(n * sizeof(void *));
	table = alloc_class(table_cls);
	if (!table)
		return -1;
	memset(table, 0, n * sizeof(void *));
	table_mask = n - 1;
	return 0;
}

static void table_grow(void)
{
	u64 n = (table_mask + 1) * 2;
	int cls = size_class(n * sizeof(void *));
	struct entry **t = alloc_class(cls);
	if (!t)
		return; /* out of memory: keep the longer chains */
	memset(t, 0, n * sizeof(void *));
	for (u64 i = 0; i <= table_mask; i++) {
		struct entry *e = table[i], *next;
		for (; e; e = next) {
			next = e->next;
			e->next = t[e->hash & (n - 1)];
			t[e->hash & (n - 1)] = e;
		}
	}
	release(table, table_cls);
	table = t;
	table_cls = cls;
	table_mask = n - 1;
}

/* The link that points at the entry for key (or at the end of its chain). */
static struct entry **lookup(const u8 *key, u64 klen, u64 h)
{
	struct entry **link = &table[h & table_mask];
	for (; *link; link = &(*link)->next) {
		struct entry *e = *link;
		if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0)
			break;
	}
	return link;
}

static struct entry *find(const u8 *key, u64 klen)
{
	return *lookup(key, klen, hash_bytes(key, klen));
}

/* Store key = val; -1 when the heap is full. */
static int store(const u8 *key, u64 klen, const u8 *val, u64 vlen)
{
	u64 h = hash_bytes(key, klen);
	struct entry **link = lookup(key, klen, h);
	struct entry *old = *link;
	u64 need = sizeof(struct entry) + klen + vlen;
	if (old && need <= ((u64)16 << old->cls)) {
		memcpy(old->data + klen, val, vlen);
		old->vlen = (u32)vlen;
		return 0;
	}
	int cls = size_class(need);
	struct entry *e = alloc_class(cls);
	if (!e)
		return -1;
	e->hash = h;
	e->klen = (u32)klen;
	e->vlen = (u32)vlen;
	e->cls = (u32)cls;
	memcpy(e->data, key, klen);
	memcpy(e->data + klen, val, vlen);
	if (old) {
		e->next = old->next;
		*link = e;
		release(old, old->cls);
	} else {
		e->next = table[h & table_mask];
		table[h & table_mask] = e;
		if (++nkeys > table_mask + 1)
			table_grow();
	}
	return 0;
}

static int delete(const u8 *key, u64 klen)
{
	struct entry **link = lookup(key, klen, hash_bytes(key, klen));
	struct entry *e = *link;
	if (!e)
		return 0;
	*link = e->next;
	release(e, e->cls);
	nkeys--;
	return 1;
}

static void flush_all(void)
{
	for (u64 i = 0; i <= table_mask; i++) {
		struct entry *e = table[i], *next;
		for (; e; e = next) {
			next = e->next;
			release(e, e->cls);
		}
		table[i] = 0;
	}
	nkeys = 0;
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

static void execute(int argc)
{
	if (is(0, "get")) {
		if (argc != 2)
			return wrong_args();
		struct entry *e = find(argv[1], argl[1]);
		if (e)
			out_bulk(e->data + e->klen, e->vlen);
		else
			out_str("$-1\r\n");
	} else if (is(0, "set")) {
		if (argc < 3)
			return wrong_args();
		if (store(argv[1], argl[1], argv[2], argl[2]) < 0)
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
			n += del ? delete(argv[i], argl[i]) : find(argv[i], argl[i]) != 0;
		out_int(n);
	} else if (is(0, "incr")) {
		if (argc != 2)
			return wrong_args();
		struct entry *e = find(argv[1], argl[1]);
		i64 v = 0;
		if (e && !to_i64(e->data + e->klen, e->vlen, &v))
			return out_str("-ERR value is not an integer or out of range\r\n");
		if (v == 0x7fffffffffffffffL)
			return out_str("-ERR increment or decrement would overflow\r\n");
		v++;
		char buf[24];
		int n = snprintf(buf, sizeof(buf), "%ld", v);
		if (store(argv[1], argl[1], (const u8 *)buf, (u64)n) < 0)
			return out_str(OOM);
		out_int(v);
	} else if (is(0, "dbsize")) {
		out_int((i64)nkeys);
	} else if (is(0, "mset")) {
		if (argc < 3 || argc % 2 == 0)
			return wrong_args();
		for (int i = 1; i < argc; i += 2)
			if (store(argv[i], argl[i], argv[i + 1], argl[i + 1]) < 0)
				return out_str(OOM);
		out_str("+OK\r\n");
	} else if (is(0, "mget")) {
		if (argc < 2)
			return wrong_args();
		out_array((u64)argc - 1);
		for (int i = 1; i < argc; i++) {
			struct entry *e = find(argv[i], argl[i]);
			if (e)
				out_bulk(e->data + e->klen, e->vlen);
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
		flush_all();
		out_str("+OK\r\n");
	} else if (is(0, "select") || is(0, "quit") || is(0, "client")) {
		out_str("+OK\r\n");
	} else if (is(0, "info")) {
		char buf[160];
		int n = snprintf(buf, sizeof(buf),
				 "# Server\r\nredis_version:7.0.0\r\nlivemig_guest:kvserver\r\n"
				 "# Keyspace\r\ndb0:keys=%lu,expires=0\r\n",
				 nkeys);
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
	if (!chain || !out || table_init(arg_u64("buckets", 4096)) < 0) {
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
