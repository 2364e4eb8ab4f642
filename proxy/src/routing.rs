//! Routing state over rtnetlink, in the namespace sluice runs in: TPROXY's
//! policy routing (`fwmark <mark> lookup <table>` and `local default dev lo
//! table <table>`, IPv4 and IPv6), and the IPv6 bypass source address on `lo`
//! that every mode's upstream connections come from.
//!
//! The API is synchronous: each call opens a netlink socket on a private
//! current-thread runtime. The socket belongs to the namespace of the calling
//! thread, which is what sluice wants (it acts on the namespace it runs in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{Future, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::linux::BYPASS_SOURCE_V6;

/// `lo` is interface 1 in every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_INDEX: u32 = 1;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot read or set net.ipv4.tcp_fwmark_accept or fwmark_reflect in this namespace")]
    Sysctl(#[source] std::io::Error),
    #[error("netlink refused to {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The policy route of one mark and table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRoute {
    pub mark: u32,
    pub table: u32,
    /// Whether the IPv6 half belongs to it: not in a namespace with IPv6
    /// disabled (see `linux::ipv6_enabled`).
    pub ipv6: bool,
}

/// What of a [`PolicyRoute`] is present in the namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub rule_v4: bool,
    pub rule_v6: bool,
    pub local_route_v4: bool,
    pub local_route_v6: bool,
    /// Whether the IPv6 half was asked for.
    pub ipv6: bool,
    /// The return path's sysctls (`tcp_fwmark_accept`, `fwmark_reflect`)
    /// are on.
    pub sysctls: bool,
}

impl RoutingState {
    pub fn complete(&self) -> bool {
        self.rule_v4
            && self.local_route_v4
            && (!self.ipv6 || self.rule_v6 && self.local_route_v6)
            && self.sysctls
    }

    /// No rule or route of the policy (the sysctl may be on for others).
    pub fn empty(&self) -> bool {
        !(self.rule_v4 || self.rule_v6 || self.local_route_v4 || self.local_route_v6)
    }
}

/// The sysctls of the return path from the workload to sluice's
/// transparent upstream sockets (`--upstream-source client`), each a bit of
/// the record below:
/// - `net.ipv4.tcp_fwmark_accept` (it covers IPv6 too): an accepted socket
///   takes the mark of the SYN that made it (unless its listener has one).
///   sluice's upstream connections carry the policy's mark, so the
///   workload's side of them takes it, and its replies to the client's
///   address follow the policy route back to sluice, not out to the client;
/// - `net.ipv4.fwmark_reflect`, `net.ipv6.fwmark_reflect`: the same for the
///   replies the kernel makes with no socket, a reset from a closed port
///   above all (without it, sluice would wait out its connect timeout for a
///   refusal that went to the client).
const SYSCTLS: [(&str, bool); 3] = [
    ("net/ipv4/tcp_fwmark_accept", false),
    ("net/ipv4/fwmark_reflect", false),
    ("net/ipv6/fwmark_reflect", true),
];

/// The protocol number of sluice's IPv4 fwmark rule is this plus the bits of
/// the sysctls sluice itself turned on: `rules remove` (another process,
/// perhaps another container of the pod) turns those off again, and only
/// those. Recorded in the namespace, beside what it explains.
const RECORD: u8 = 0xa0;

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{name}")
}

/// The bits of the sysctls the policy needs that are off.
fn sysctls_off(ipv6: bool) -> Result<u8, Error> {
    let mut off = 0;
    for (bit, (name, v6_only)) in SYSCTLS.iter().enumerate() {
        if *v6_only && !ipv6 {
            continue;
        }
        let value = std::fs::read_to_string(sysctl_path(name)).map_err(Error::Sysctl)?;
        if value.trim() == "0" {
            off |= 1 << bit;
        }
    }
    Ok(off)
}

fn set_sysctls(bits: u8, on: bool) -> Result<(), Error> {
    for (bit, (name, _)) in SYSCTLS.iter().enumerate() {
        if bits & (1 << bit) != 0 {
            std::fs::write(sysctl_path(name), if on { "1" } else { "0" }).map_err(Error::Sysctl)?;
        }
    }
    Ok(())
}

/// The sysctl bits a rule records, if it is a record.
fn recorded(rule: &RuleMessage) -> u8 {
    rule.attributes
        .iter()
        .find_map(|attribute| match attribute {
            RuleAttribute::Protocol(RouteProtocol::Other(value)) if value & 0xf8 == RECORD => {
                Some(value & 0x07)
            }
            _ => None,
        })
        .unwrap_or(0)
}

impl PolicyRoute {
    /// The lines `ip rule` / `ip route` would show for this policy, for
    /// `--dry-run` and `rules show`.
    pub fn describe(&self) -> Vec<String> {
        let PolicyRoute { mark, table, ipv6 } = *self;
        let mut lines: Vec<String> = SYSCTLS
            .iter()
            .filter(|(_, v6_only)| ipv6 || !v6_only)
            .map(|(name, _)| format!("sysctl -w {}=1", name.replace('/', ".")))
            .collect();
        lines.push(format!("ip -4 rule add fwmark {mark} lookup {table}"));
        if ipv6 {
            lines.push(format!("ip -6 rule add fwmark {mark} lookup {table}"));
        }
        lines.push(format!(
            "ip -4 route add local 0.0.0.0/0 dev lo table {table}"
        ));
        if ipv6 {
            lines.push(format!("ip -6 route add local ::/0 dev lo table {table}"));
        }
        lines
    }

    /// Installs whatever part is missing; installing twice leaves one copy.
    pub fn install(&self) -> Result<(), Error> {
        let policy = *self;
        with_netlink(move |handle| async move {
            let state = policy.read_with(&handle).await?;
            let off = sysctls_off(policy.ipv6)?;
            if off != 0 {
                // The IPv4 rule records which sysctls sluice turned on,
                // with those an earlier install recorded.
                let earlier = policy
                    .matching_rules(&handle, IpVersion::V4)
                    .await?
                    .iter()
                    .fold(0, |bits, rule| bits | recorded(rule));
                policy.delete_rules(&handle, IpVersion::V4).await?;
                policy
                    .add_rule(&handle, IpVersion::V4, off | earlier)
                    .await?;
                set_sysctls(off, true)?;
            } else if !state.rule_v4 {
                policy.add_rule(&handle, IpVersion::V4, 0).await?;
            }
            if policy.ipv6 && !state.rule_v6 {
                policy.add_rule(&handle, IpVersion::V6, 0).await?;
            }
            for version in policy.versions() {
                policy.add_local_route(&handle, version).await?;
            }
            Ok(())
        })
    }

    /// Removes every rule and route of this policy; succeeds when nothing is
    /// installed.
    pub fn remove(&self) -> Result<(), Error> {
        let policy = *self;
        with_netlink(move |handle| async move {
            let turned_on_by_sluice = policy
                .matching_rules(&handle, IpVersion::V4)
                .await?
                .iter()
                .fold(0, |bits, rule| bits | recorded(rule));
            for version in policy.versions() {
                policy.delete_rules(&handle, version).await?;
            }
            set_sysctls(turned_on_by_sluice, false)?;
            for route in policy.local_routes(&handle).await? {
                let del = handle.route().del(route).execute().await;
                ignore_errno(del, ESRCH).map_err(netlink("delete the local route"))?;
            }
            Ok(())
        })
    }

    /// Reads back, over netlink, what of this policy is installed.
    pub fn read(&self) -> Result<RoutingState, Error> {
        let policy = *self;
        with_netlink(move |handle| async move { policy.read_with(&handle).await })
    }

    async fn read_with(&self, handle: &Handle) -> Result<RoutingState, Error> {
        let routes = self.local_routes(handle).await?;
        let is_v4 = |r: &&RouteMessage| {
            r.header.address_family == rtnetlink::packet_route::AddressFamily::Inet
        };
        let rule_v6 = self.ipv6 && !self.matching_rules(handle, IpVersion::V6).await?.is_empty();
        Ok(RoutingState {
            rule_v4: !self.matching_rules(handle, IpVersion::V4).await?.is_empty(),
            rule_v6,
            local_route_v4: routes.iter().any(|r| is_v4(&r)),
            local_route_v6: routes.iter().any(|r| !is_v4(&r)),
            ipv6: self.ipv6,
            sysctls: sysctls_off(self.ipv6)? == 0,
        })
    }

    async fn delete_rules(&self, handle: &Handle, version: IpVersion) -> Result<(), Error> {
        for rule in self.matching_rules(handle, version).await? {
            let del = handle.rule().del(rule).execute().await;
            ignore_errno(del, ENOENT).map_err(netlink("delete the fwmark rule"))?;
        }
        Ok(())
    }

    /// The IP versions this policy covers.
    fn versions(&self) -> Vec<IpVersion> {
        if self.ipv6 {
            vec![IpVersion::V4, IpVersion::V6]
        } else {
            vec![IpVersion::V4]
        }
    }

    async fn add_rule(&self, handle: &Handle, version: IpVersion, record: u8) -> Result<(), Error> {
        let request = handle
            .rule()
            .add()
            .fw_mark(self.mark)
            .table_id(self.table)
            // Without an explicit action the kernel takes the rule for a no-op.
            .action(RuleAction::ToTable);
        let result = match version {
            IpVersion::V4 => {
                let mut request = request.v4();
                if record != 0 {
                    let protocol = RouteProtocol::Other(RECORD | record);
                    request
                        .message_mut()
                        .attributes
                        .push(RuleAttribute::Protocol(protocol));
                }
                request.execute().await
            }
            IpVersion::V6 => request.v6().execute().await,
        };
        ignore_errno(result, EEXIST).map_err(netlink(format!(
            "add the rule 'fwmark {} lookup {}'",
            self.mark, self.table
        )))
    }

    async fn add_local_route(&self, handle: &Handle, version: IpVersion) -> Result<(), Error> {
        let message = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(LOOPBACK_INDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(LOOPBACK_INDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
        };
        // Replace makes a second install a no-op rather than an EEXIST.
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!(
                "add 'local default dev lo table {}'",
                self.table
            )))
    }

    async fn matching_rules(
        &self,
        handle: &Handle,
        version: IpVersion,
    ) -> Result<Vec<RuleMessage>, Error> {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("list ip rules"))?;
        Ok(rules
            .into_iter()
            .filter(|rule| {
                let mut mark = None;
                let mut table = u32::from(rule.header.table);
                for attribute in &rule.attributes {
                    match attribute {
                        RuleAttribute::FwMark(m) => mark = Some(*m),
                        RuleAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                mark == Some(self.mark) && table == self.table
            })
            .collect())
    }

    async fn local_routes(&self, handle: &Handle) -> Result<Vec<RouteMessage>, Error> {
        let mut found = Vec::new();
        // Without NETLINK_GET_STRICT_CHK the kernel dumps every route of the
        // family; the message only chooses the family.
        let mut families = vec![RouteMessageBuilder::<Ipv4Addr>::new().build()];
        if self.ipv6 {
            families.push(RouteMessageBuilder::<Ipv6Addr>::new().build());
        }
        for filter in families {
            let routes: Vec<RouteMessage> = handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("list routes"))?;
            found.extend(
                routes
                    .into_iter()
                    .filter(|route| self.is_our_local_route(route)),
            );
        }
        Ok(found)
    }

    fn is_our_local_route(&self, route: &RouteMessage) -> bool {
        let mut table = u32::from(route.header.table);
        let mut oif = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        table == self.table
            && route.header.kind == RouteType::Local
            && route.header.destination_prefix_length == 0
            && oif == Some(LOOPBACK_INDEX)
    }
}

/// The IPv6 bypass source (`::6/128` on `lo`). 127.0.0.6 needs no such
/// thing: all of 127.0.0.0/8 is local already.
pub struct BypassSource;

impl BypassSource {
    pub fn describe() -> String {
        format!("ip -6 addr add {BYPASS_SOURCE_V6}/128 dev lo")
    }

    pub fn install() -> Result<(), Error> {
        with_netlink(|handle| async move {
            if bypass_address(&handle).await?.is_some() {
                return Ok(());
            }
            let add = handle
                .address()
                .add(LOOPBACK_INDEX, IpAddr::V6(BYPASS_SOURCE_V6), 128)
                .execute();
            ignore_errno(add.await, EEXIST)
                .map_err(netlink(format!("add {BYPASS_SOURCE_V6}/128 to lo")))
        })
    }

    pub fn remove() -> Result<(), Error> {
        with_netlink(|handle| async move {
            if let Some(address) = bypass_address(&handle).await? {
                let del = handle.address().del(address).execute().await;
                ignore_errno(del, EADDRNOTAVAIL)
                    .map_err(netlink(format!("remove {BYPASS_SOURCE_V6} from lo")))?;
            }
            Ok(())
        })
    }

    pub fn present() -> Result<bool, Error> {
        with_netlink(|handle| async move { Ok(bypass_address(&handle).await?.is_some()) })
    }
}

async fn bypass_address(handle: &Handle) -> Result<Option<AddressMessage>, Error> {
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(LOOPBACK_INDEX)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the addresses of lo"))?;
    Ok(addresses.into_iter().find(|message| {
        message.attributes.iter().any(|attribute| {
            matches!(attribute, AddressAttribute::Address(IpAddr::V6(a)) if *a == BYPASS_SOURCE_V6)
        })
    }))
}

fn with_netlink<F, Fut, T>(work: F) -> Result<T, Error>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(Error::Socket)?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
        tokio::spawn(connection);
        work(handle).await
    })
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// Treats one errno as success: "already there" on add, "already gone" on
/// delete, which is what makes install and remove idempotent.
fn ignore_errno(result: Result<(), rtnetlink::Error>, errno: i32) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(message))
            if message.code.map(|code| -code.get()) == Some(errno) =>
        {
            Ok(())
        }
        other => other,
    }
}
