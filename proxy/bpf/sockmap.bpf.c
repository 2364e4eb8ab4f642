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

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Two entries per connection in each map.
#define MAX_SOCKETS 131072

struct peer {
	__u64 cookie; // the peer's socket cookie
	__u64 bytes;  // bytes redirected from this socket to the peer
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
	if (verdict == SK_PASS)
		__sync_fetch_and_add(&peer->bytes, skb->len);
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
