use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{veth, Netns, Result};

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

    /// Namespaces `sl-<purpose>-cli-…` and `sl-<purpose>-pod-…`, joined by a
    /// veth, addressed and up.
    pub fn new(purpose: &str) -> Result<ClientPod> {
        let client = Netns::new(&format!("{purpose}-cli"))?;
        let pod = Netns::new(&format!("{purpose}-pod"))?;
        ClientPod::wire(client, pod)
    }

    /// The same topology on two namespaces made by the caller.
    pub fn wire(client: Netns, pod: Netns) -> Result<ClientPod> {
        veth(&client, Self::CLIENT_IF, &pod, Self::POD_IF)?;
        for (ns, ifname, v4, v6) in [
            (&client, Self::CLIENT_IF, Self::CLIENT_V4, Self::CLIENT_V6),
            (&pod, Self::POD_IF, Self::POD_V4, Self::POD_V6),
        ] {
            ns.add_addr(ifname, v4.into(), Self::V4_PREFIX)?;
            ns.add_addr(ifname, v6.into(), Self::V6_PREFIX)?;
        }
        Ok(ClientPod { client, pod })
    }
}
