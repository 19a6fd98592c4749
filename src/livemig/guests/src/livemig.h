/*
 * livemig.h - the freestanding runtime every livemig guest program is built with.
 *
 * The first half is the C side of the guest ABI fixed in livemig/machine/abi.py (memory
 * layout, struct boot_info, struct guest_report, I/O ports); tests/guests/test_layout.py checks
 * every constant and every field offset here against abi.py, so the two cannot drift apart.
 * The second half declares what runtime.c and entry.S provide: serial printing, the guest
 * clock, sleeping, boot arguments, exit, and the mem* functions gcc may call on its own.
 *
 * A guest program defines  int main(int cpu, const struct boot_info *bi);  it runs on every
 * vCPU. When main returns on vCPU 0 its value is the machine's exit status; on any other vCPU
 * the CPU parks (sleeps forever), like a secondary CPU with nothing to do.
 */
#ifndef LIVEMIG_H
#define LIVEMIG_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed long i64;
typedef unsigned long size_t;

/* ---- guest ABI: keep in step with livemig/machine/abi.py ---- */
#define PAGE_SIZE 4096
#define BOOT_INFO_ADDR 0x1000
#define GUEST_REPORT_ADDR 0x2000
#define STACK_TOP 0x100000
#define STACK_SIZE 0x10000
#define MAX_CPUS 8
#define LOAD_ADDR 0x100000
#define HEAP_ALIGN 0x100000
#define BLOCK_ALIGN 0x200000
#define MIN_RAM 0x400000

#define SERIAL_BASE 0x3F8
#define POWER_PORT 0x501
#define CLOCK_PORT_LO 0x510
#define CLOCK_PORT_HI 0x514
#define SLEEP_PORT 0x518
#define RING_DOORBELL_PORT 0x520
#define RING_WAIT_PORT 0x524
#define RING_SPACE_PORT 0x528
#define RING_SETUP_PORT 0x52C
#define CONSOLE_LOCK_PORT 0x530

#define RING_ADDR 0x10000
#define RING_SIZE 0x70000

#define BOOT_MAGIC 0x47494D4556494CUL
#define REPORT_MAGIC 0x54524F5045524D4CUL
#define CMDLINE_SIZE 1024
#define MAX_BLOCKS 8

#define REPORT_KIND_MEMSTRESS 1
#define REPORT_KIND_COMPUTE 2
#define REPORT_KIND_IDLE 3

struct ram_block_info {
	u64 gpa;
	u64 size;
};

struct boot_info {
	u64 magic;
	u64 ram_size; /* block 0 */
	u32 ncpus;
	u32 nblocks;
	u64 heap_start;
	u64 heap_end;
	struct ram_block_info blocks[MAX_BLOCKS];
	char cmdline[CMDLINE_SIZE];
};

struct guest_report {
	u64 magic; /* written last: a reader trusts the rest only once it is set */
	u64 kind;
	u64 ws_start;
	u64 ws_pages;
	u64 nslices;
	u64 passes[MAX_CPUS];
};

/* volatile: the host reads it while the guest runs, so every store must really happen. */
#define GUEST_REPORT ((volatile struct guest_report *)GUEST_REPORT_ADDR)

/* ---- runtime ---- */
#define barrier() __asm__ __volatile__("" ::: "memory")
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define NS_PER_SEC 1000000000UL

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }

/* The boot information and vCPU count, set by the runtime before main runs. */
extern const struct boot_info *lm_boot_info;

void putc(char c);
void puts(const char *s); /* no newline added */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap);

u64 clock_ns(void);       /* guest time; stops while the machine is paused */
void sleep_us(u32 usecs); /* host-side sleep; a pause of the machine wakes it early */
void sleep_until_ns(u64 deadline);

/* Boot arguments: the cmdline is "key=value key2=value2 flag"; a missing key gives dflt. */
const char *arg_str(const char *key, char *buf, size_t size);
u64 arg_u64(const char *key, u64 dflt);  /* decimal or 0x hex */
u64 arg_size(const char *key, u64 dflt); /* with K/M/G/T suffixes (binary) */
int arg_flag(const char *key);           /* "key" or "key=1" present */

void exit(int status) __attribute__((noreturn));
void park(void) __attribute__((noreturn));

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

int main(int cpu, const struct boot_info *bi);

#endif
