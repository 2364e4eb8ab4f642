//! Topologies as data: which namespaces, their sysctls, the veth links
//! between them with their addresses and link impairments. A [`Spec`] is
//! built in one call into a [`Lab`] of namespace guards, so dropping the lab
//! removes everything (interfaces and qdiscs go with their namespaces).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{veth, Error, Netem, Netns, Result};

/// A topology to build.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    pub hosts: Vec<Host>,
    pub links: Vec<Link>,
}

/// One network namespace of the topology.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    /// Short name, part of the namespace's name: `[A-Za-z0-9_-]`.
    pub name: String,
    /// `net.*` sysctls set inside the namespace, in order, e.g.
    /// `("net.ipv4.tcp_tw_reuse", "1")`.
    pub sysctls: Vec<(String, String)>,
}

/// A veth pair between two hosts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Link {
    pub a: End,
    pub b: End,
}

/// One end of a [`Link`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct End {
    /// The [`Host::name`] this end lives in.
    pub host: String,
    pub ifname: String,
    /// Addresses with their prefix lengths (benchmarking ranges only).
    pub addrs: Vec<(IpAddr, u8)>,
    /// Delay and loss added to packets leaving through this end.
    pub netem: Option<Netem>,
}

impl Spec {
    /// Builds the topology in fresh namespaces named
    /// `sl-<purpose>-<host>-<pid>-<n>`.
    pub fn build(&self, purpose: &str) -> Result<Lab> {
        let namespaces = self
            .hosts
            .iter()
            .map(|host| Netns::new(&format!("{purpose}-{}", host.name)))
            .collect::<Result<Vec<_>>>()?;
        self.wire(namespaces)
    }

    /// Builds the topology in namespaces the caller made, one per host, in
    /// the order of [`Spec::hosts`]. On error the namespaces are dropped
    /// (and so removed, unless they were persisted).
    pub fn wire(&self, namespaces: Vec<Netns>) -> Result<Lab> {
        if namespaces.len() != self.hosts.len() {
            return Err(Error::Invalid(format!(
                "the topology has {} hosts but {} namespaces were given",
                self.hosts.len(),
                namespaces.len()
            )));
        }
        let lab = Lab {
            hosts: self
                .hosts
                .iter()
                .map(|h| h.name.clone())
                .zip(namespaces)
                .collect(),
        };
        for host in &self.hosts {
            let ns = lab.host(&host.name)?;
            for (key, value) in &host.sysctls {
                ns.sysctl_set(key, value)?;
            }
        }
        for link in &self.links {
            let (a, b) = (lab.host(&link.a.host)?, lab.host(&link.b.host)?);
            veth(a, &link.a.ifname, b, &link.b.ifname)?;
            for (end, ns) in [(&link.a, a), (&link.b, b)] {
                for &(addr, prefix_len) in &end.addrs {
                    ns.add_addr(&end.ifname, addr, prefix_len)?;
                }
                if let Some(netem) = &end.netem {
                    ns.set_netem(&end.ifname, netem)?;
                }
            }
        }
        Ok(lab)
    }
}

/// A built topology: its namespaces, removed when the lab is dropped.
#[derive(Debug)]
pub struct Lab {
    hosts: Vec<(String, Netns)>,
}

impl Lab {
    /// The namespace of host `name`.
    pub fn host(&self, name: &str) -> Result<&Netns> {
        self.hosts
            .iter()
            .find(|(host, _)| host == name)
            .map(|(_, ns)| ns)
            .ok_or_else(|| Error::Invalid(format!("the topology has no host {name:?}")))
    }

    /// Takes host `name`'s namespace out of the lab (its guard now owns it).
    pub fn take(&mut self, name: &str) -> Result<Netns> {
        let at = self
            .hosts
            .iter()
            .position(|(host, _)| host == name)
            .ok_or_else(|| Error::Invalid(format!("the topology has no host {name:?}")))?;
        Ok(self.hosts.remove(at).1)
    }
}

/// The standard inbound topology: `client` ns ⇄ veth ⇄ `pod` ns, both ends
/// addressed on one /24 and one /64, so no routes are needed.
#[derive(Debug)]
pub struct ClientPod {
    pub client: Netns,
    pub pod: Netns,
}

impl ClientPod {
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    pub const V4_PREFIX: u8 = 24;
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    pub const V6_PREFIX: u8 = 64;
    pub const CLIENT_IF: &'static str = "eth0";
    pub const POD_IF: &'static str = "eth0";

    /// The topology as a [`Spec`], hosts `cli` and `pod`, to build with
    /// changes (sysctls, netem on a link end).
    pub fn spec() -> Spec {
        let end = |host: &str, ifname: &str, v4: Ipv4Addr, v6: Ipv6Addr| End {
            host: host.into(),
            ifname: ifname.into(),
            addrs: vec![(v4.into(), Self::V4_PREFIX), (v6.into(), Self::V6_PREFIX)],
            netem: None,
        };
        Spec {
            hosts: ["cli", "pod"]
                .map(|name| Host {
                    name: name.into(),
                    sysctls: Vec::new(),
                })
                .to_vec(),
            links: vec![Link {
                a: end("cli", Self::CLIENT_IF, Self::CLIENT_V4, Self::CLIENT_V6),
                b: end("pod", Self::POD_IF, Self::POD_V4, Self::POD_V6),
            }],
        }
    }

    /// Namespaces `sl-<purpose>-cli-…` and `sl-<purpose>-pod-…`, joined by a
    /// veth, addressed and up.
    pub fn new(purpose: &str) -> Result<ClientPod> {
        ClientPod::from_lab(ClientPod::spec().build(purpose)?)
    }

    /// The same topology on two namespaces made by the caller.
    pub fn wire(client: Netns, pod: Netns) -> Result<ClientPod> {
        ClientPod::from_lab(ClientPod::spec().wire(vec![client, pod])?)
    }

    /// A lab built from [`ClientPod::spec`], possibly changed.
    pub fn from_lab(mut lab: Lab) -> Result<ClientPod> {
        Ok(ClientPod {
            client: lab.take("cli")?,
            pod: lab.take("pod")?,
        })
    }
}
