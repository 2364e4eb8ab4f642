// SPDX-License-Identifier: Apache-2.0
//
// sluice's sockmap forwarder (`--forward sockmap`): an sk_skb stream-verdict
// program that hands every byte a socket receives straight to its peer's send
// side, so the two sockets of an intercepted connection are joined inside the
// kernel and user space only opens, watches and closes them.
//
// Maps, all keyed by socket cookie and written by
// proxy/src/forward/sockmap.rs:
// - sl_socks: sockets whose received bytes are redirected. The program is
//   attached to this map, so inserting a socket here is what starts the
//   redirection of its bytes.
// - sl_targets: sockets bytes may be redirected to. Both sockets of a
//   connection go here before either goes into sl_socks, so a redirect never
//   meets a peer that is not there yet (the kernel would drop those bytes).
// - sl_peers: per socket, the cookie of its peer and how many bytes were
//   redirected to it. User space compares that count with what the peer has
//   taken into its send queue before it passes a FIN on: the kernel queues
//   redirected bytes on the peer's psock and sends them from a workqueue, so
//   seeing the FIN on one socket does not mean the peer has sent everything.
//   The entry also names the worker thread that watches the connection.
// - sl_events: per worker, a ring buffer. The kernel sets no bound on the
//   bytes queued for a peer whose send buffer is full (a workload slower
//   than its client), so the program tells the connection's worker each
//   time a socket has redirected another STEP bytes; the worker compares
//   what was redirected with what the peer took, and above a mark takes the
//   socket out of sl_socks until the peer catches up: TCP's own flow control
//   then holds the client back.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Two entries per connection in each map.
#define MAX_SOCKETS 131072
// Data-path threads that may join connections.
#define MAX_WORKERS 1024
// A worker hears of a socket each time it has redirected this many more
// bytes (a power of two): often enough to bound what waits for a slow peer,
// rarely enough to cost nothing measurable (about 1,000 events a second at
// 17 Gbit/s).
#define STEP_SHIFT 21

struct peer {
	__u64 cookie; // the peer's socket cookie
	__u64 bytes;  // bytes redirected from this socket to the peer
	__u32 worker; // index into sl_events
	__u32 unused;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} sl_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} sl_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	// Entries are made per connection; no need to hold memory for all.
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct peer);
} sl_peers SEC(".maps");

struct events {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_WORKERS);
	__type(key, __u32);
	__array(values, struct events);
} sl_events SEC(".maps");

SEC("sk_skb/stream_verdict")
int sluice_verdict(struct __sk_buff *skb)
{
	// The FIN arrives as an skb without payload: there is nothing to
	// forward, and user space passes the FIN on itself (after the peer has
	// sent every byte counted below).
	if (skb->len == 0)
		return SK_DROP;

	__u64 cookie = bpf_get_socket_cookie(skb);
	struct peer *peer = bpf_map_lookup_elem(&sl_peers, &cookie);
	// User space makes the peer entry before the socket enters sl_socks and
	// removes it only after both directions ended: no entry means a
	// connection being torn down, whose bytes have nowhere to go.
	if (!peer)
		return SK_DROP;

	__u64 target = peer->cookie;
	long verdict = bpf_sk_redirect_hash(skb, &sl_targets, &target, 0);
	if (verdict != SK_PASS)
		return verdict;
	__u64 before = __sync_fetch_and_add(&peer->bytes, skb->len);
	if ((before >> STEP_SHIFT) != ((before + skb->len) >> STEP_SHIFT)) {
		__u32 worker = peer->worker;
		void *events = bpf_map_lookup_elem(&sl_events, &worker);
		// A full ring drops the event; the next step sends another.
		if (events)
			bpf_ringbuf_output(events, &cookie, sizeof(cookie), 0);
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
