/*
 * runtime.c - the freestanding C runtime linked into every livemig guest: start-up after the
 * entry stub, serial output (16550 at SERIAL_BASE), the guest clock and sleep ports, boot
 * argument parsing, exit, and the mem and str functions gcc may emit calls to.
 */
#include "livemig.h"

const struct boot_info *lm_boot_info;

extern char __bss_end[];

/* ---- serial console ---- */

#define LSR_THR_EMPTY 0x20

/*
 * One line at a time: vCPUs print from different host threads, so a whole line is written
 * under this lock or their characters would interleave. The lock is the serial device's
 * (CONSOLE_LOCK_PORT): an xchg in guest memory is not atomic between vCPUs here, since each
 * runs in its own emulator instance, and two vCPUs printing on the same clock tick garbled
 * lines. Bounded: on a machine without the port (reads as all ones) the guest prints anyway,
 * a garbled line at worst, never a hang.
 */
static void lock_print(void)
{
	for (u32 i = 0; i < 1000000 && inl(CONSOLE_LOCK_PORT); i++)
		cpu_relax();
}

static void unlock_print(void) { outl(CONSOLE_LOCK_PORT, 0); }

static void serial_write(char c)
{
	/* Bounded: a device that never reports THR empty must not hang the guest. */
	for (int i = 0; i < 1000 && !(inb(SERIAL_BASE + 5) & LSR_THR_EMPTY); i++)
		cpu_relax();
	outb(SERIAL_BASE, (u8)c);
}

void putc(char c)
{
	lock_print();
	serial_write(c);
	unlock_print();
}

static void write_locked(const char *s, size_t n)
{
	lock_print();
	for (size_t i = 0; i < n; i++)
		serial_write(s[i]);
	unlock_print();
}

void puts(const char *s) { write_locked(s, strlen(s)); }

/* ---- formatting: %d %i %u %x %X %p %s %c %%, with l/ll/z, width and 0 padding ---- */

struct out {
	char *buf;
	size_t size;
	size_t len; /* what would have been written, as C's snprintf reports */
};

static void emit(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void emit_num(struct out *o, u64 v, int neg, unsigned base, int upper, int width, char pad)
{
	char tmp[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;
	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	int len = n + neg;
	if (neg && pad == '0')
		emit(o, '-');
	for (; width > len; width--)
		emit(o, pad);
	if (neg && pad != '0')
		emit(o, '-');
	while (n)
		emit(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap)
{
	struct out o = {buf, size, 0};
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(&o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, longs = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			longs++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			i64 v = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			emit_num(&o, v < 0 ? -(u64)v : (u64)v, v < 0, 10, 0, width, pad);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			u64 v = longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned);
			emit_num(&o, v, 0, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, pad);
			break;
		}
		case 'p':
			emit(&o, '0');
			emit(&o, 'x');
			emit_num(&o, (u64)__builtin_va_arg(ap, void *), 0, 16, 0, width, pad);
			break;
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			size_t n = strlen(s);
			for (; width > (int)n; width--)
				emit(&o, ' ');
			while (*s)
				emit(&o, *s++);
			break;
		}
		case 'c':
			emit(&o, (char)__builtin_va_arg(ap, int));
			break;
		case '%':
			emit(&o, '%');
			break;
		case '\0':
			fmt--; /* a lone '%' at the end: stop at the terminator */
			break;
		default: /* unknown conversion: show it rather than guess */
			emit(&o, '%');
			emit(&o, *fmt);
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = '\0';
	return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	__builtin_va_end(ap);
	return n;
}

int printf(const char *fmt, ...)
{
	char buf[256];
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	__builtin_va_end(ap);
	write_locked(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
	return n;
}

/* ---- clock and sleep ---- */

u64 clock_ns(void)
{
	u32 lo = inl(CLOCK_PORT_LO); /* latches the whole value */
	u32 hi = inl(CLOCK_PORT_HI);
	return ((u64)hi << 32) | lo;
}

void sleep_us(u32 usecs) { outl(SLEEP_PORT, usecs); }

void sleep_until_ns(u64 deadline)
{
	/* A pause wakes the sleep early, so loop until the guest clock really got there. */
	for (u64 now = clock_ns(); now < deadline; now = clock_ns()) {
		u64 us = (deadline - now + 999) / 1000;
		sleep_us(us > 1000000 ? 1000000 : (u32)us);
	}
}

/* ---- boot arguments ---- */

static const char *arg_find(const char *key, size_t *vlen)
{
	const char *p = lm_boot_info->cmdline;
	const char *end = p + CMDLINE_SIZE;
	size_t klen = strlen(key);
	while (p < end && *p) {
		while (p < end && *p == ' ')
			p++;
		const char *word = p;
		while (p < end && *p && *p != ' ')
			p++;
		size_t wlen = (size_t)(p - word);
		if (wlen >= klen && memcmp(word, key, klen) == 0) {
			if (wlen == klen) {
				*vlen = 0;
				return word + klen;
			}
			if (word[klen] == '=') {
				*vlen = wlen - klen - 1;
				return word + klen + 1;
			}
		}
	}
	return 0;
}

const char *arg_str(const char *key, char *buf, size_t size)
{
	size_t n;
	const char *v = arg_find(key, &n);
	if (!v || !size)
		return 0;
	if (n >= size)
		n = size - 1;
	memcpy(buf, v, n);
	buf[n] = '\0';
	return buf;
}

static u64 parse_u64(const char *s, size_t n, size_t *used)
{
	u64 v = 0;
	size_t i = 0;
	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		for (i = 2; i < n; i++) {
			char c = s[i];
			unsigned d;
			if (c >= '0' && c <= '9')
				d = c - '0';
			else if (c >= 'a' && c <= 'f')
				d = c - 'a' + 10;
			else if (c >= 'A' && c <= 'F')
				d = c - 'A' + 10;
			else
				break;
			v = v * 16 + d;
		}
	} else {
		for (; i < n && s[i] >= '0' && s[i] <= '9'; i++)
			v = v * 10 + (u64)(s[i] - '0');
	}
	*used = i;
	return v;
}

u64 arg_u64(const char *key, u64 dflt)
{
	size_t n, used;
	const char *v = arg_find(key, &n);
	if (!v || !n)
		return dflt;
	return parse_u64(v, n, &used);
}

u64 arg_size(const char *key, u64 dflt)
{
	size_t n, used;
	const char *v = arg_find(key, &n);
	if (!v || !n)
		return dflt;
	u64 x = parse_u64(v, n, &used);
	if (used < n) {
		switch (v[used] | 0x20) { /* lower case */
		case 'k':
			x <<= 10;
			break;
		case 'm':
			x <<= 20;
			break;
		case 'g':
			x <<= 30;
			break;
		case 't':
			x <<= 40;
			break;
		}
	}
	return x;
}

int arg_flag(const char *key)
{
	size_t n;
	const char *v = arg_find(key, &n);
	return v && (n == 0 || !(n == 1 && v[0] == '0'));
}

/* ---- start, exit, park ---- */

void exit(int status)
{
	/* Not while another vCPU is halfway through a line: the machine ends at the power port,
	 * and that line would come out cut (seen once: "compute: cpu1 448" after cpu0's "done"). */
	lock_print();
	outl(POWER_PORT, (u32)status);
	/* The machine stops us at the power port; should it not, never run on. */
	park();
}

void park(void)
{
	for (;;)
		sleep_us(1000000);
}

void lm_start(u64 cpu, const struct boot_info *bi) __attribute__((noreturn));

void lm_start(u64 cpu, const struct boot_info *bi)
{
	lm_boot_info = bi;
	if (cpu == 0) {
		if (bi->magic != BOOT_MAGIC) {
			puts("livemig runtime: bad boot_info magic\n");
			exit(125);
		}
		if (bi->heap_start < (u64)__bss_end) {
			printf("livemig runtime: heap_start 0x%lx overlaps the image (ends 0x%lx)\n",
			       bi->heap_start, (u64)__bss_end);
			exit(125);
		}
	}
	int status = main((int)cpu, bi);
	if (cpu == 0)
		exit(status);
	park();
}

/* ---- mem and str: string instructions, so gcc cannot turn a loop back into a call ---- */

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ __volatile__("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	if ((u64)dst <= (u64)src || (u64)dst >= (u64)src + n)
		return memcpy(dst, src, n);
	/* Overlap with dst above src: copy backwards. */
	const char *s = (const char *)src + n - 1;
	char *d = (char *)dst + n - 1;
	__asm__ __volatile__("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ __volatile__("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}
