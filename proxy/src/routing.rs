//! Routing state over rtnetlink, in the namespace sluice runs in: TPROXY's
//! policy routing (`fwmark <mark> lookup <table>` and `local default dev lo
//! table <table>`, IPv4 and IPv6), and the IPv6 bypass source address on `lo`
//! that every mode's upstream connections come from.
//!
//! What sluice adds carries [`PROTOCOL`], and only that is ever removed: the
//! same rule, route or address added by someone else stays.
//!
//! The API is synchronous: each call opens a netlink socket on a private
//! current-thread runtime. The socket belongs to the namespace of the calling
//! thread, which is what sluice wants (it acts on the namespace it runs in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{Future, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressProtocol};
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

/// The protocol number of the fwmark rules, local routes and `::6` address
/// sluice adds. It tells them from the same rule, route or address added by
/// someone else (Istio's `fwmark 1337 lookup 133` and its local route, an
/// init container's `::6`), which sluice never removes; and it is kept in
/// the namespace, so `rules remove` in another process (another container of
/// the pod, perhaps) finds them. sluice's IPv4 rule adds to it the bits of
/// the sysctls sluice itself turned on (0xa0-0xa7, see [`SYSCTLS`]).
pub const PROTOCOL: u8 = 0xa0;
const SYSCTL_BITS: u8 = 0x07;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot read or set net.ipv4.tcp_fwmark_accept or fwmark_reflect in this namespace")]
    Sysctl(#[source] std::io::Error),
    /// A container's /proc/sys is read-only (podman, containerd, CRI-O):
    /// the pod must set them.
    #[error(
        "cannot turn on {} here: /proc/sys is read-only, as in a container. Set them to 1 for \
         the pod instead (Kubernetes: the pod's securityContext.sysctls, with the kubelet \
         allowing them by --allowed-unsafe-sysctls, as deploy/sluice-tproxy.yaml says; podman: \
         --sysctl NAME=1), or use --upstream-source bypass, which needs none",
        names.join(", ")
    )]
    SysctlsReadOnly {
        names: Vec<String>,
        #[source]
        source: std::io::Error,
    },
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

/// Whether a rule, route or address is there, and whose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Presence {
    #[default]
    Missing,
    /// Added by sluice: it carries [`PROTOCOL`].
    Sluice,
    /// The same, added by someone else: it serves sluice too, and sluice
    /// leaves it where it is.
    Other,
}

impl Presence {
    pub fn present(self) -> bool {
        self != Presence::Missing
    }

    /// Of the matching objects, each told sluice's or not.
    fn of(sluices: impl IntoIterator<Item = bool>) -> Presence {
        sluices
            .into_iter()
            .fold(Presence::Missing, |presence, sluice| {
                match (presence, sluice) {
                    (Presence::Sluice, _) | (_, true) => Presence::Sluice,
                    _ => Presence::Other,
                }
            })
    }
}

impl std::fmt::Display for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Presence::Missing => "missing",
            Presence::Sluice => "present",
            Presence::Other => "present (not sluice's)",
        })
    }
}

/// What of a [`PolicyRoute`] is present in the namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub rule_v4: Presence,
    pub rule_v6: Presence,
    pub local_route_v4: Presence,
    pub local_route_v6: Presence,
    /// Whether the IPv6 half was asked for.
    pub ipv6: bool,
    /// The return path's sysctls (`tcp_fwmark_accept`, `fwmark_reflect`)
    /// are on.
    pub sysctls: bool,
}

impl RoutingState {
    /// Everything the policy needs is there, whoever added it.
    pub fn complete(&self) -> bool {
        self.rule_v4.present()
            && self.local_route_v4.present()
            && (!self.ipv6 || self.rule_v6.present() && self.local_route_v6.present())
            && self.sysctls
    }

    /// No rule or route of sluice's (someone else's may be there, and the
    /// sysctls may be on for others).
    pub fn empty(&self) -> bool {
        ![
            self.rule_v4,
            self.rule_v6,
            self.local_route_v4,
            self.local_route_v6,
        ]
        .contains(&Presence::Sluice)
    }
}

/// What one [`PolicyRoute::install`] added, so that [`PolicyRoute::undo`]
/// takes away that and nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Added {
    rule_v4: bool,
    rule_v6: bool,
    /// The record of sluice's IPv4 rule that the install replaced (to
    /// record more sysctls): undo puts it back.
    replaced_v4: Option<u8>,
    local_route_v4: bool,
    local_route_v6: bool,
    /// The sysctl bits the install turned on.
    sysctls: u8,
}

impl Added {
    pub fn is_empty(&self) -> bool {
        *self == Added::default()
    }
}

/// The sysctls of the return path from the workload to sluice's
/// transparent upstream sockets (`--upstream-source client`), each a bit of
/// the record in sluice's IPv4 rule (see [`PROTOCOL`]):
/// - `net.ipv4.tcp_fwmark_accept` (it covers IPv6 too): an accepted socket
///   takes the mark of the SYN that made it (unless its listener has one).
///   sluice's upstream connections carry the policy's mark, so the
///   workload's side of them takes it, and its replies to the client's
///   address follow the policy route back to sluice, not out to the client;
/// - `net.ipv4.fwmark_reflect`, `net.ipv6.fwmark_reflect`: the same for the
///   replies the kernel makes with no socket, a reset from a closed port
///   above all (without it, sluice would wait out its connect timeout for a
///   refusal that went to the client).
///
/// Removal turns off those sluice turned on, and only those.
const SYSCTLS: [(&str, bool); 3] = [
    ("net/ipv4/tcp_fwmark_accept", false),
    ("net/ipv4/fwmark_reflect", false),
    ("net/ipv6/fwmark_reflect", true),
];

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
    let named = |bit: usize| bits & (1 << bit) != 0;
    for (_, (name, _)) in SYSCTLS.iter().enumerate().filter(|(bit, _)| named(*bit)) {
        let written = std::fs::write(sysctl_path(name), if on { "1" } else { "0" });
        match written {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                let names = SYSCTLS
                    .iter()
                    .enumerate()
                    .filter(|(bit, _)| named(*bit))
                    .map(|(_, (name, _))| name.replace('/', "."))
                    .collect();
                return Err(Error::SysctlsReadOnly { names, source });
            }
            Err(source) => return Err(Error::Sysctl(source)),
        }
    }
    Ok(())
}

fn is_sluices(protocol: u8) -> bool {
    protocol & !SYSCTL_BITS == PROTOCOL
}

fn rule_protocol(rule: &RuleMessage) -> u8 {
    rule.attributes
        .iter()
        .find_map(|attribute| match attribute {
            RuleAttribute::Protocol(protocol) => Some(u8::from(*protocol)),
            _ => None,
        })
        .unwrap_or(0)
}

fn is_sluices_rule(rule: &RuleMessage) -> bool {
    is_sluices(rule_protocol(rule))
}

/// The sysctl bits a rule records (none, if it is not sluice's).
fn recorded(rule: &RuleMessage) -> u8 {
    let protocol = rule_protocol(rule);
    if is_sluices(protocol) {
        protocol & SYSCTL_BITS
    } else {
        0
    }
}

fn is_sluices_route(route: &RouteMessage) -> bool {
    route.header.protocol == RouteProtocol::Other(PROTOCOL)
}

/// The IP versions of a namespace with or without IPv6.
fn versions(ipv6: bool) -> Vec<IpVersion> {
    if ipv6 {
        vec![IpVersion::V4, IpVersion::V6]
    } else {
        vec![IpVersion::V4]
    }
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
        lines.push(format!(
            "ip -4 rule add fwmark {mark} lookup {table} protocol {PROTOCOL}"
        ));
        if ipv6 {
            lines.push(format!(
                "ip -6 rule add fwmark {mark} lookup {table} protocol {PROTOCOL}"
            ));
        }
        lines.push(format!(
            "ip -4 route add local 0.0.0.0/0 dev lo table {table} proto {PROTOCOL}"
        ));
        if ipv6 {
            lines.push(format!(
                "ip -6 route add local ::/0 dev lo table {table} proto {PROTOCOL}"
            ));
        }
        lines
    }

    /// Installs whatever part is missing, and notes in `added` each thing it
    /// adds as soon as it has (so that a failure half-way can be undone);
    /// installing twice leaves one copy. A rule or route someone else added
    /// serves as it is, except the rule: sluice adds its own beside it, which
    /// keeps the sysctl record and does not depend on the other staying.
    pub fn install(&self, added: &mut Added) -> Result<(), Error> {
        let policy = *self;
        with_netlink(move |handle| async move {
            let ours_v4: Vec<RuleMessage> = policy
                .matching_rules(&handle, IpVersion::V4)
                .await?
                .into_iter()
                .filter(is_sluices_rule)
                .collect();
            let off = sysctls_off(policy.ipv6)?;
            if ours_v4.is_empty() || off != 0 {
                // The IPv4 rule records which sysctls sluice turned on, with
                // those an earlier install recorded.
                let earlier = ours_v4.iter().fold(0, |bits, rule| bits | recorded(rule));
                if !ours_v4.is_empty() {
                    added.replaced_v4 = Some(earlier);
                    delete_rules(&handle, ours_v4).await?;
                }
                policy
                    .add_rule(&handle, IpVersion::V4, PROTOCOL | off | earlier)
                    .await?;
                added.rule_v4 = true;
                added.sysctls = off;
                set_sysctls(off, true)?;
            }
            if policy.ipv6
                && policy
                    .sluices_rules(&handle, IpVersion::V6)
                    .await?
                    .is_empty()
            {
                policy.add_rule(&handle, IpVersion::V6, PROTOCOL).await?;
                added.rule_v6 = true;
            }
            let routes = policy.local_routes(&handle).await?;
            for version in versions(policy.ipv6) {
                if !routes.iter().any(|route| is_version(route, &version)) {
                    policy.add_local_route(&handle, &version).await?;
                    match version {
                        IpVersion::V4 => added.local_route_v4 = true,
                        IpVersion::V6 => added.local_route_v6 = true,
                    }
                }
            }
            Ok(())
        })
    }

    /// Takes away what one install added (and puts back the rule it
    /// replaced). The sysctls, rules and routes are undone each whatever
    /// became of the others; the first failure is returned.
    pub fn undo(&self, added: &Added) -> Result<(), Error> {
        let policy = *self;
        let added = added.clone();
        with_netlink(move |handle| async move {
            let sysctls = set_sysctls(added.sysctls, false);
            let rules = policy.undo_rules(&handle, &added).await;
            let routes = policy.undo_routes(&handle, &added).await;
            sysctls.and(rules).and(routes)
        })
    }

    async fn undo_rules(&self, handle: &Handle, added: &Added) -> Result<(), Error> {
        for (version, was_added) in [
            (IpVersion::V4, added.rule_v4),
            (IpVersion::V6, added.rule_v6),
        ] {
            if was_added {
                delete_rules(handle, self.sluices_rules(handle, version).await?).await?;
            }
        }
        if let Some(earlier) = added.replaced_v4 {
            self.add_rule(handle, IpVersion::V4, PROTOCOL | earlier)
                .await?;
        }
        Ok(())
    }

    async fn undo_routes(&self, handle: &Handle, added: &Added) -> Result<(), Error> {
        let ours = self
            .local_routes(handle)
            .await?
            .into_iter()
            .filter(|route| {
                is_sluices_route(route)
                    && (added.local_route_v4 && is_version(route, &IpVersion::V4)
                        || added.local_route_v6 && is_version(route, &IpVersion::V6))
            })
            .collect();
        delete_routes(handle, ours).await
    }

    /// Reads back, over netlink, what of this policy is installed.
    pub fn read(&self) -> Result<RoutingState, Error> {
        let policy = *self;
        with_netlink(move |handle| async move { policy.read_with(&handle).await })
    }

    async fn read_with(&self, handle: &Handle) -> Result<RoutingState, Error> {
        let routes = self.local_routes(handle).await?;
        let route = |version| {
            Presence::of(
                routes
                    .iter()
                    .filter(|route| is_version(route, &version))
                    .map(is_sluices_route),
            )
        };
        let rules = |rules: Vec<RuleMessage>| Presence::of(rules.iter().map(is_sluices_rule));
        let rule_v6 = if self.ipv6 {
            rules(self.matching_rules(handle, IpVersion::V6).await?)
        } else {
            Presence::Missing
        };
        Ok(RoutingState {
            rule_v4: rules(self.matching_rules(handle, IpVersion::V4).await?),
            rule_v6,
            local_route_v4: route(IpVersion::V4),
            local_route_v6: route(IpVersion::V6),
            ipv6: self.ipv6,
            sysctls: sysctls_off(self.ipv6)? == 0,
        })
    }

    async fn add_rule(
        &self,
        handle: &Handle,
        version: IpVersion,
        protocol: u8,
    ) -> Result<(), Error> {
        let request = handle
            .rule()
            .add()
            .fw_mark(self.mark)
            .table_id(self.table)
            // Without an explicit action the kernel takes the rule for a no-op.
            .action(RuleAction::ToTable);
        let protocol = RuleAttribute::Protocol(RouteProtocol::Other(protocol));
        let result = match version {
            IpVersion::V4 => {
                let mut request = request.v4();
                request.message_mut().attributes.push(protocol);
                request.execute().await
            }
            IpVersion::V6 => {
                let mut request = request.v6();
                request.message_mut().attributes.push(protocol);
                request.execute().await
            }
        };
        ignore_errno(result, EEXIST).map_err(netlink(format!(
            "add the rule 'fwmark {} lookup {}'",
            self.mark, self.table
        )))
    }

    /// Adds the local route, failing (EEXIST) rather than replacing another
    /// default route of the table.
    async fn add_local_route(&self, handle: &Handle, version: &IpVersion) -> Result<(), Error> {
        let protocol = RouteProtocol::Other(PROTOCOL);
        let message = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(LOOPBACK_INDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(protocol)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(LOOPBACK_INDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(protocol)
                .build(),
        };
        handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(netlink(format!(
                "add 'local default dev lo table {}'",
                self.table
            )))
    }

    /// The rules `fwmark <mark> lookup <table>`, whoever added them.
    async fn matching_rules(
        &self,
        handle: &Handle,
        version: IpVersion,
    ) -> Result<Vec<RuleMessage>, Error> {
        Ok(list_rules(handle, version)
            .await?
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

    async fn sluices_rules(
        &self,
        handle: &Handle,
        version: IpVersion,
    ) -> Result<Vec<RuleMessage>, Error> {
        let mut rules = self.matching_rules(handle, version).await?;
        rules.retain(is_sluices_rule);
        Ok(rules)
    }

    /// The routes `local default dev lo` of the table, whoever added them.
    async fn local_routes(&self, handle: &Handle) -> Result<Vec<RouteMessage>, Error> {
        let mut routes = list_routes(handle, self.ipv6).await?;
        routes.retain(|route| self.is_local_route(route));
        Ok(routes)
    }

    fn is_local_route(&self, route: &RouteMessage) -> bool {
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

/// `rules remove`: every fwmark rule and route of sluice's in this
/// namespace, whatever mark and table (and mode: ebpf's pinned program
/// leaves them too) installed them, and the sysctls those rules record
/// sluice turned on. The same rule or route added by someone else stays.
pub fn remove_sluices(ipv6: bool) -> Result<(), Error> {
    with_netlink(move |handle| async move {
        let mut turned_on_by_sluice = 0;
        for version in versions(ipv6) {
            let ours: Vec<RuleMessage> = list_rules(&handle, version)
                .await?
                .into_iter()
                .filter(is_sluices_rule)
                .collect();
            turned_on_by_sluice |= ours.iter().fold(0, |bits, rule| bits | recorded(rule));
            delete_rules(&handle, ours).await?;
        }
        set_sysctls(turned_on_by_sluice, false)?;
        let mut routes = list_routes(&handle, ipv6).await?;
        routes.retain(is_sluices_route);
        delete_routes(&handle, routes).await
    })
}

async fn list_rules(handle: &Handle, version: IpVersion) -> Result<Vec<RuleMessage>, Error> {
    handle
        .rule()
        .get(version)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list ip rules"))
}

async fn delete_rules(handle: &Handle, rules: Vec<RuleMessage>) -> Result<(), Error> {
    for rule in rules {
        // The message as listed, protocol included: the kernel deletes
        // that rule, not another one with the same mark and table.
        let del = handle.rule().del(rule).execute().await;
        ignore_errno(del, ENOENT).map_err(netlink("delete the fwmark rule"))?;
    }
    Ok(())
}

/// Every route of the families, in every table.
async fn list_routes(handle: &Handle, ipv6: bool) -> Result<Vec<RouteMessage>, Error> {
    let mut found = Vec::new();
    // Without NETLINK_GET_STRICT_CHK the kernel dumps every route of the
    // family; the message only chooses the family.
    let mut families = vec![RouteMessageBuilder::<Ipv4Addr>::new().build()];
    if ipv6 {
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
        found.extend(routes);
    }
    Ok(found)
}

async fn delete_routes(handle: &Handle, routes: Vec<RouteMessage>) -> Result<(), Error> {
    for route in routes {
        // As listed, protocol included: the kernel deletes only a route
        // with that protocol.
        let del = handle.route().del(route).execute().await;
        ignore_errno(del, ESRCH).map_err(netlink("delete the local route"))?;
    }
    Ok(())
}

fn is_version(route: &RouteMessage, version: &IpVersion) -> bool {
    let v4 = route.header.address_family == rtnetlink::packet_route::AddressFamily::Inet;
    v4 == matches!(version, IpVersion::V4)
}

/// The IPv6 bypass source (`::6/128` on `lo`). 127.0.0.6 needs no such
/// thing: all of 127.0.0.0/8 is local already.
pub struct BypassSource;

impl BypassSource {
    pub fn describe() -> String {
        format!("ip -6 addr add {BYPASS_SOURCE_V6}/128 dev lo proto {PROTOCOL}")
    }

    /// Adds `::6` to `lo`, carrying [`PROTOCOL`], unless it is there (then
    /// it stays whose it is); says whether it added it.
    pub fn install() -> Result<bool, Error> {
        with_netlink(|handle| async move {
            if bypass_address(&handle).await?.is_some() {
                return Ok(false);
            }
            let mut add = handle
                .address()
                .add(LOOPBACK_INDEX, IpAddr::V6(BYPASS_SOURCE_V6), 128);
            add.message_mut()
                .attributes
                .push(AddressAttribute::Protocol(AddressProtocol::Other(PROTOCOL)));
            add.execute()
                .await
                .map_err(netlink(format!("add {BYPASS_SOURCE_V6}/128 to lo")))?;
            Ok(true)
        })
    }

    /// Removes `::6` from `lo` if sluice added it; leaves it otherwise.
    pub fn remove() -> Result<(), Error> {
        with_netlink(|handle| async move {
            match bypass_address(&handle).await? {
                Some(address) if is_sluices_address(&address) => {
                    let del = handle.address().del(address).execute().await;
                    ignore_errno(del, EADDRNOTAVAIL)
                        .map_err(netlink(format!("remove {BYPASS_SOURCE_V6} from lo")))
                }
                _ => Ok(()),
            }
        })
    }

    pub fn present() -> Result<Presence, Error> {
        with_netlink(|handle| async move {
            let address = bypass_address(&handle).await?;
            Ok(Presence::of(address.iter().map(is_sluices_address)))
        })
    }
}

fn is_sluices_address(address: &AddressMessage) -> bool {
    address.attributes.iter().any(|attribute| {
        matches!(attribute, AddressAttribute::Protocol(AddressProtocol::Other(p)) if *p == PROTOCOL)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluices_protocols_are_0xa0_to_0xa7_and_nothing_else() {
        for protocol in 0..=u8::MAX {
            assert_eq!(
                is_sluices(protocol),
                (0xa0..=0xa7).contains(&protocol),
                "{protocol:#x}"
            );
        }
    }

    #[test]
    fn presence_is_sluices_if_any_of_the_matches_is() {
        assert_eq!(Presence::of([]), Presence::Missing);
        assert_eq!(Presence::of([false, false]), Presence::Other);
        assert_eq!(Presence::of([false, true, false]), Presence::Sluice);
        assert_eq!(Presence::of([true]), Presence::Sluice);
    }
}
