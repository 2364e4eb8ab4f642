// SPDX-License-Identifier: Apache-2.0
//
// sluice's eBPF interception: an sk_lookup program attached to the pod's
// network namespace. For a new TCP connection (the kernel runs sk_lookup when
// a packet matches no established socket, i.e. for SYNs) it picks sluice's
// listening socket instead of the one the regular lookup would find. Nothing
// in netfilter, routing or conntrack is involved, and the accepted socket's
// getsockname() is still the destination the client asked for.
//
// All policy lives in maps, written by proxy/src/intercept/ebpf.rs. The maps
// hold two policy slots; user space rewrites the inactive one and then flips
// `sl_active`, so every connection sees either the whole old or the whole new
// policy, never a mix, and a change never reattaches the program.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// From <sys/socket.h> and <netinet/in.h>, which do not build for -target bpf.
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

// lo's index in every network namespace.
#define LOOPBACK_IFINDEX 1

// Policy slots; the layout is mirrored in ebpf.rs (`Slot`).
#define SLOTS 2
#define PORT_WORDS (65536 / 64)
#define SLOT_INTERCEPT_ALL 1

// Listener indexes in sl_listeners.
#define LISTENER_V4 0
#define LISTENER_V6 1

struct slot {
	__u32 flags;
	__u32 _pad;
	// Bitmaps over destination ports: bit (port % 64) of word (port / 64).
	__u64 intercept[PORT_WORDS];
	__u64 exclude[PORT_WORDS];
};

// Keys of the client-CIDR tries. The slot comes first and is always matched
// in full (prefixlen = 32 + CIDR length), so one trie holds both slots.
struct cidr4_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 addr; // network byte order
};

struct cidr6_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 addr[4]; // network byte order
};

struct iface_key {
	__u32 slot;
	__u32 ifindex;
};

// Index 0 holds the active slot (0 or 1).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} sl_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, struct slot);
} sl_slots SEC(".maps");

// Excluded client CIDRs, up to 1024 per slot; LPM tries must be created
// without preallocation.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 2048);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr4_key);
	__type(value, __u8);
} sl_cidr_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 2048);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr6_key);
	__type(value, __u8);
} sl_cidr_v6 SEC(".maps");

// Excluded ingress interfaces, by ifindex, up to 128 per slot.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct iface_key);
	__type(value, __u8);
} sl_ifaces SEC(".maps");

// sluice's listening sockets. A sockmap (not an fd) because the program must
// be handed a socket reference it can pass to bpf_sk_assign; the kernel drops
// an entry by itself when its socket closes.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} sl_listeners SEC(".maps");

// Whether a connection stays inside the pod: from loopback, from the address
// it goes to (how the pod reaches its own address), or from sluice's bypass
// source (127.0.0.6 is loopback; ::6 is not). Those are not intercepted, as in
// Istio's inbound capture; sluice's own upstream connections are among them,
// and catching those again would loop. The ingress interface alone does not
// tell: a packet to the pod's own address over lo reports that address's
// interface.
static __always_inline int inside_pod(const struct bpf_sk_lookup *ctx)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	if (ctx->family == AF_INET)
		return (bpf_ntohl(ctx->remote_ip4) >> 24) == 127 ||
		       ctx->remote_ip4 == ctx->local_ip4;
	__u32 r0 = ctx->remote_ip6[0], r1 = ctx->remote_ip6[1];
	__u32 r2 = ctx->remote_ip6[2], r3 = ctx->remote_ip6[3];
	if (r0 == 0 && r1 == 0 && r2 == 0 &&
	    (r3 == bpf_htonl(1) || r3 == bpf_htonl(6)))
		return 1;
	return r0 == ctx->local_ip6[0] && r1 == ctx->local_ip6[1] &&
	       r2 == ctx->local_ip6[2] && r3 == ctx->local_ip6[3];
}

static __always_inline int port_bit(const __u64 *bitmap, __u32 port)
{
	port &= 0xffff; // bounds the index for the verifier
	return (bitmap[port >> 6] >> (port & 63)) & 1;
}

SEC("sk_lookup")
int sluice_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	__u32 zero = 0;
	__u32 *active = bpf_map_lookup_elem(&sl_active, &zero);
	if (!active)
		return SK_PASS;
	__u32 slot = *active & 1;
	struct slot *policy = bpf_map_lookup_elem(&sl_slots, &slot);
	if (!policy)
		return SK_PASS;

	if (inside_pod(ctx))
		return SK_PASS;

	__u32 family = ctx->family;
	__u32 listener;
	if (family == AF_INET)
		listener = LISTENER_V4;
	else if (family == AF_INET6)
		listener = LISTENER_V6;
	else
		return SK_PASS;

	__u32 port = ctx->local_port;
	if (port_bit(policy->exclude, port))
		return SK_PASS;

	if (family == AF_INET) {
		struct cidr4_key key = {
			.prefixlen = 64,
			.slot = slot,
			.addr = ctx->remote_ip4,
		};
		if (bpf_map_lookup_elem(&sl_cidr_v4, &key))
			return SK_PASS;
	} else {
		struct cidr6_key key = {
			.prefixlen = 160,
			.slot = slot,
			.addr = { ctx->remote_ip6[0], ctx->remote_ip6[1],
				  ctx->remote_ip6[2], ctx->remote_ip6[3] },
		};
		if (bpf_map_lookup_elem(&sl_cidr_v6, &key))
			return SK_PASS;
	}

	struct iface_key iface = { .slot = slot, .ifindex = ctx->ingress_ifindex };
	if (bpf_map_lookup_elem(&sl_ifaces, &iface))
		return SK_PASS;

	if (!(policy->flags & SLOT_INTERCEPT_ALL) && !port_bit(policy->intercept, port))
		return SK_PASS;

	// Fail closed: a connection the policy intercepts must never reach the
	// workload around sluice. With no listener in the map (sluice gone, the
	// link pinned) the SYN is refused (RST), as with REDIRECT to a closed port.
	struct bpf_sock *sk = bpf_map_lookup_elem(&sl_listeners, &listener);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

// No GPL-only helper is used (bpf_sk_assign, bpf_sk_release and map lookups
// are not), so the project's license is accepted; bpf_printk would need a
// GPL-compatible string here.
char LICENSE[] SEC("license") = "Apache-2.0";
