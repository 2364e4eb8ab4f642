//! Links, addresses and routes over rtnetlink, always from inside a namespace.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use nix::errno::Errno;
use rtnetlink::packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{check_addr, check_prefix, Error, Netns, Result};

impl Netns {
    /// Runs `f` against a netlink socket opened inside this namespace: a
    /// netlink socket acts on the namespace it was created in.
    fn netlink<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.try_run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| Error::os("starting a tokio runtime for netlink", e))?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
                    Error::os(format!("opening a netlink socket in {}", self.name()), e)
                })?;
                tokio::spawn(conn);
                f(handle).await
            })
        })?
    }

    fn nl_err(&self, op: String) -> impl FnOnce(rtnetlink::Error) -> Error + '_ {
        move |source| Error::Netlink {
            ns: self.name().to_owned(),
            op,
            source,
        }
    }

    async fn index_of(&self, h: &Handle, ifname: &str) -> Result<u32> {
        let mut links = pin!(h.link().get().match_name(ifname).execute());
        let no_such_link = || Error::NoSuchLink {
            ns: self.name().to_owned(),
            ifname: ifname.to_owned(),
        };
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(no_such_link()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::ENODEV as i32) => {
                Err(no_such_link())
            }
            Err(e) => Err(self.nl_err(format!("looking up interface {ifname}"))(e)),
        }
    }

    pub fn link_index(&self, ifname: &str) -> Result<u32> {
        self.netlink(|h| async move { self.index_of(&h, ifname).await })
    }

    pub fn set_link_up(&self, ifname: &str) -> Result<()> {
        self.netlink(|h| async move {
            let index = self.index_of(&h, ifname).await?;
            let msg = LinkUnspec::new_with_index(index).up().build();
            let up = h.link().change(msg).execute().await;
            up.map_err(self.nl_err(format!("setting {ifname} up")))
        })
    }

    /// Adds `addr/prefix_len` to `ifname`; IPv6 addresses skip duplicate
    /// address detection (IFA_F_NODAD), so they are usable at once.
    pub fn add_addr(&self, ifname: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        check_addr(addr)?;
        check_prefix(addr, prefix_len)?;
        self.netlink(|h| async move {
            let index = self.index_of(&h, ifname).await?;
            let mut req = h.address().add(index, addr, prefix_len);
            if addr.is_ipv6() {
                req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            let added = req.execute().await;
            added.map_err(self.nl_err(format!("adding {addr}/{prefix_len} to {ifname}")))
        })
    }

    /// Adds a route to `dst/prefix_len` (host bits are cleared) through the
    /// gateway `via`, in the main table.
    pub fn add_route(&self, dst: IpAddr, prefix_len: u8, via: IpAddr) -> Result<()> {
        check_addr(via)?;
        check_prefix(dst, prefix_len)?;
        if dst.is_ipv4() != via.is_ipv4() {
            return Err(Error::Invalid(format!(
                "route to {dst}/{prefix_len} via {via}: destination and gateway must be the same IP version"
            )));
        }
        let dst = network(dst, prefix_len);
        let op = format!("adding route {dst}/{prefix_len} via {via}");
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, prefix_len)
            .and_then(|b| b.gateway(via))
            .map_err(|e| Error::Invalid(format!("{op}: {e}")))?
            .build();
        self.netlink(|h| async move { h.route().add(msg).execute().await.map_err(self.nl_err(op)) })
    }
}

/// Delay, jitter and loss that the `netem` qdisc adds to every packet
/// leaving an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Netem {
    pub delay: Duration,
    /// Each packet's delay varies uniformly by up to this much either way.
    pub jitter: Duration,
    /// Share of packets dropped, from 0 to 100.
    pub loss_percent: f64,
}

impl Netem {
    /// Packets the qdisc may hold: tc's default, too small for a bulk
    /// stream delayed by milliseconds at veth speed.
    const LIMIT: u32 = 10_000;

    /// `TCA_OPTIONS` of netem: a raw `struct tc_netem_qopt`, then nested
    /// attributes. The 64-bit nanosecond latency and jitter attributes say
    /// exactly what is meant; the struct's own fields are in scheduler ticks
    /// (64 ns on current kernels) and are overridden by them.
    fn options(&self) -> Result<Vec<u8>> {
        const TCA_NETEM_LATENCY64: u16 = 10;
        const TCA_NETEM_JITTER64: u16 = 11;
        if !(0.0..=100.0).contains(&self.loss_percent) {
            return Err(Error::Invalid(format!(
                "netem loss {}%: give a share from 0 to 100",
                self.loss_percent
            )));
        }
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let ticks = |d: Duration| u32::try_from(nanos(d) >> 6).unwrap_or(u32::MAX);
        // 0 is no loss and u32::MAX is all packets; the cast saturates.
        let loss = (self.loss_percent / 100.0 * f64::from(u32::MAX)).round() as u32;
        let mut out = Vec::with_capacity(48);
        for field in [
            ticks(self.delay),
            Self::LIMIT,
            loss,
            0,
            0,
            ticks(self.jitter),
        ] {
            out.extend_from_slice(&field.to_ne_bytes());
        }
        for (kind, value) in [
            (TCA_NETEM_LATENCY64, nanos(self.delay)),
            (TCA_NETEM_JITTER64, nanos(self.jitter)),
        ] {
            out.extend_from_slice(&12u16.to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(&value.to_ne_bytes());
        }
        Ok(out)
    }
}

impl Netns {
    /// Makes `netem` the root qdisc of `ifname`, so packets sent through it
    /// are delayed and dropped as `netem` says. rtnetlink has no builder for
    /// netem's options, so the request is composed here.
    pub fn set_netem(&self, ifname: &str, netem: &Netem) -> Result<()> {
        const TCA_OPTIONS: u16 = 2;
        let options = netem.options()?;
        self.netlink(|mut h| async move {
            let index = self.index_of(&h, ifname).await?;
            let op = format!("adding netem {netem:?} to {ifname}");
            let mut msg = TcMessage::with_index(i32::try_from(index).unwrap_or(i32::MAX));
            msg.header.parent = TcHandle::ROOT;
            msg.attributes.push(TcAttribute::Kind("netem".into()));
            msg.attributes
                .push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, options)));
            let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
            req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            let mut answers = h.request(req).map_err(self.nl_err(op.clone()))?;
            while let Some(answer) = answers.next().await {
                let NetlinkPayload::Error(e) = answer.payload else {
                    continue;
                };
                if e.code.is_none() {
                    continue; // the ACK
                }
                // The kernel answers ENOENT for a qdisc kind it does not have.
                if e.raw_code() == -(Errno::ENOENT as i32) {
                    return Err(Error::Unsupported(format!(
                        "{op}: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM);                          run on a kernel that has it, or leave netem out of the topology"
                    )));
                }
                return Err(self.nl_err(op)(rtnetlink::Error::NetlinkError(e)));
            }
            Ok(())
        })
    }
}

fn network(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

/// Creates a veth pair, `a_if` in `a` and `b_if` in `b`, both up.
///
/// The request is sent inside `a` and names `b` (by fd) as the peer's
/// namespace, so the peer is born in `b` under its final name and nothing
/// ever appears in the caller's namespace. The pair vanishes when either
/// namespace is removed.
///
/// The peer is brought up by a second request: the kernel configures the peer
/// before it links the two ends, and opening an unlinked veth fails (ENOTCONN).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    let b_fd = b.fd().as_raw_fd();
    a.netlink(|h| async move {
        let peer = LinkUnspec::new_with_name(b_if).setns_by_fd(b_fd).build();
        let msg = LinkVeth::new(a_if, b_if)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        let added = h.link().add(msg).execute().await;
        added.map_err(a.nl_err(format!(
            "creating veth {a_if} with peer {b_if} in {}",
            b.name()
        )))
    })?;
    b.set_link_up(b_if)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_masks_host_bits() {
        let n = |a: &str, p| network(a.parse().unwrap(), p).to_string();
        assert_eq!(n("198.18.1.7", 24), "198.18.1.0");
        assert_eq!(n("198.18.1.7", 0), "0.0.0.0");
        assert_eq!(n("198.18.1.7", 32), "198.18.1.7");
        assert_eq!(n("2001:2:0:1::9", 64), "2001:2:0:1::");
        assert_eq!(n("2001:2::9", 0), "::");
    }
}
