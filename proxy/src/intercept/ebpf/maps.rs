//! The maps of `bpf/sk_lookup.bpf.c`: their byte layout (mirrored from the C
//! structs and checked against the skeleton's generated types at compile
//! time), and writing and reading a policy through them.
//!
//! A policy is written into the inactive one of two slots and then made
//! active by one 4-byte write of `sl_active`, so a connection is decided by
//! either the whole old policy or the whole new one. The entries of the slot
//! that was left stay until the next update reuses it: a program that read
//! the old slot index a moment ago may still be looking them up.

use std::collections::BTreeSet;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::{skel, Error};

const PORT_WORDS: usize = 65536 / 64;
const SLOT_SIZE: usize = 8 + 2 * PORT_WORDS * 8;
const INTERCEPT_OFFSET: usize = 8;
const EXCLUDE_OFFSET: usize = 8 + PORT_WORDS * 8;
const SLOT_INTERCEPT_ALL: u32 = 1;
const CIDR4_KEY_SIZE: usize = 12;
const CIDR6_KEY_SIZE: usize = 24;
const IFACE_KEY_SIZE: usize = 8;
/// The slot index occupies the first 32 bits of every trie key.
const SLOT_PREFIX_BITS: u32 = 32;

/// Per slot: the tries hold 2048 entries and the interface map 256, shared
/// by both slots.
pub(super) const MAX_CIDRS_PER_FAMILY: usize = 1024;
pub(super) const MAX_INTERFACES: usize = 128;

pub(super) const LISTENER_V4: u32 = 0;
pub(super) const LISTENER_V6: u32 = 1;

// If the C structs change, these stop compiling instead of corrupting maps.
const _: () = assert!(size_of::<skel::types::slot>() == SLOT_SIZE);
const _: () = assert!(size_of::<skel::types::cidr4_key>() == CIDR4_KEY_SIZE);
const _: () = assert!(size_of::<skel::types::cidr6_key>() == CIDR6_KEY_SIZE);
const _: () = assert!(size_of::<skel::types::iface_key>() == IFACE_KEY_SIZE);

/// The names the maps have in the object, in the kernel and as pin files.
pub(super) const NAMES: [&str; 6] = [
    "sl_active",
    "sl_slots",
    "sl_cidr_v4",
    "sl_cidr_v6",
    "sl_ifaces",
    "sl_listeners",
];

/// A policy as the maps hold it: interfaces by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Encoded {
    pub intercept_all: bool,
    pub ports: BTreeSet<u16>,
    pub exclude_ports: BTreeSet<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ifindexes: BTreeSet<u32>,
}

/// Handles on the six maps (each its own file descriptor, so they outlive
/// the object they were loaded with).
#[derive(Debug)]
pub(super) struct Maps {
    active: MapHandle,
    slots: MapHandle,
    cidr_v4: MapHandle,
    cidr_v6: MapHandle,
    ifaces: MapHandle,
    listeners: MapHandle,
}

fn map_err(op: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> Error {
    let op = op.into();
    move |source| Error::Map { op, source }
}

impl Maps {
    pub fn from_skel(maps: &skel::SkLookupMaps<'_>) -> Result<Maps, Error> {
        let dup = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(&**map).map_err(map_err("duplicating a map descriptor"))
        };
        Maps {
            active: dup(&maps.sl_active)?,
            slots: dup(&maps.sl_slots)?,
            cidr_v4: dup(&maps.sl_cidr_v4)?,
            cidr_v6: dup(&maps.sl_cidr_v6)?,
            ifaces: dup(&maps.sl_ifaces)?,
            listeners: dup(&maps.sl_listeners)?,
        }
        .checked()
    }

    pub fn from_pinned(dir: &Path) -> Result<Maps, Error> {
        let open = |name: &str| {
            let path = dir.join(name);
            MapHandle::from_pinned_path(&path).map_err(map_err(format!(
                "opening the pinned map {}",
                path.display()
            )))
        };
        Maps {
            active: open(NAMES[0])?,
            slots: open(NAMES[1])?,
            cidr_v4: open(NAMES[2])?,
            cidr_v6: open(NAMES[3])?,
            ifaces: open(NAMES[4])?,
            listeners: open(NAMES[5])?,
        }
        .checked()
    }

    /// The maps of a loaded program, found by the ids the kernel lists for
    /// it; `None` if one is missing (not a sluice program after all).
    pub fn from_ids(ids: &[u32]) -> Result<Option<Maps>, Error> {
        let mut found: [Option<MapHandle>; 6] = Default::default();
        for &id in ids {
            let map = MapHandle::from_map_id(id).map_err(map_err(format!("opening map {id}")))?;
            let name = map.name().to_string_lossy().into_owned();
            if let Some(i) = NAMES.iter().position(|n| *n == name) {
                found[i] = Some(map);
            }
        }
        let [Some(active), Some(slots), Some(cidr_v4), Some(cidr_v6), Some(ifaces), Some(listeners)] =
            found
        else {
            return Ok(None);
        };
        Maps {
            active,
            slots,
            cidr_v4,
            cidr_v6,
            ifaces,
            listeners,
        }
        .checked()
        .map(Some)
    }

    /// Refuses maps whose key or value sizes differ from this build's (a
    /// pin or a program left by another sluice version): every byte offset
    /// below relies on them.
    fn checked(self) -> Result<Maps, Error> {
        let expected = [
            (4, 4),
            (4, SLOT_SIZE),
            (CIDR4_KEY_SIZE, 1),
            (CIDR6_KEY_SIZE, 1),
            (IFACE_KEY_SIZE, 1),
            (4, 8),
        ];
        for ((name, map), (key, value)) in self.each().into_iter().zip(expected) {
            let got = (map.key_size() as usize, map.value_size() as usize);
            if got != (key, value) {
                return Err(Error::Corrupt(format!(
                    "map {name} has {}-byte keys and {}-byte values, this sluice expects {key} and {value}: another sluice version made it",
                    got.0, got.1
                )));
            }
        }
        Ok(self)
    }

    fn each(&self) -> [(&'static str, &MapHandle); 6] {
        [
            (NAMES[0], &self.active),
            (NAMES[1], &self.slots),
            (NAMES[2], &self.cidr_v4),
            (NAMES[3], &self.cidr_v6),
            (NAMES[4], &self.ifaces),
            (NAMES[5], &self.listeners),
        ]
    }

    /// The kernel ids of the six maps.
    pub fn ids(&self) -> Result<BTreeSet<u32>, Error> {
        self.each()
            .into_iter()
            .map(|(name, map)| {
                libbpf_rs::MapInfo::new(map.as_fd())
                    .map(|info| info.info.id)
                    .map_err(map_err(format!("reading the id of map {name}")))
            })
            .collect()
    }

    /// Pins every map as `dir/<name>`; on failure removes those it pinned.
    pub fn pin(&mut self, dir: &Path) -> Result<(), Error> {
        let mut done = Vec::new();
        for (name, map) in [
            (NAMES[0], &mut self.active),
            (NAMES[1], &mut self.slots),
            (NAMES[2], &mut self.cidr_v4),
            (NAMES[3], &mut self.cidr_v6),
            (NAMES[4], &mut self.ifaces),
            (NAMES[5], &mut self.listeners),
        ] {
            let path = dir.join(name);
            if let Err(source) = map.pin(&path) {
                for path in done {
                    let _ = std::fs::remove_file(path);
                }
                return Err(Error::Pin { path, source });
            }
            done.push(path);
        }
        Ok(())
    }

    fn active_slot(&self) -> Result<u32, Error> {
        let value = self
            .active
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err("reading sl_active"))?
            .ok_or_else(|| Error::Corrupt("sl_active has no entry 0".into()))?;
        Ok(u32_at(&value, 0) & 1)
    }

    /// Writes `policy` into the inactive slot, then activates it.
    pub fn write(&self, policy: &Encoded) -> Result<(), Error> {
        let next = self.active_slot()? ^ 1;

        // Leftovers of the policy before the current one.
        for (name, map, key_size) in [
            ("sl_cidr_v4", &self.cidr_v4, CIDR4_KEY_SIZE),
            ("sl_cidr_v6", &self.cidr_v6, CIDR6_KEY_SIZE),
            ("sl_ifaces", &self.ifaces, IFACE_KEY_SIZE),
        ] {
            let stale: Vec<Vec<u8>> = map
                .keys()
                .filter(|key| key.len() == key_size && slot_of(name, key) == next)
                .collect();
            for key in stale {
                map.delete(&key)
                    .map_err(map_err(format!("clearing slot {next} of {name}")))?;
            }
        }

        let present = [1u8];
        for cidr in &policy.exclude_cidrs {
            let (map, key, name) = match cidr {
                IpNet::V4(net) => (&self.cidr_v4, cidr4_key(next, net), "sl_cidr_v4"),
                IpNet::V6(net) => (&self.cidr_v6, cidr6_key(next, net), "sl_cidr_v6"),
            };
            map.update(&key, &present, MapFlags::ANY)
                .map_err(map_err(format!("adding {cidr} to {name}")))?;
        }
        for &ifindex in &policy.exclude_ifindexes {
            self.ifaces
                .update(&iface_key(next, ifindex), &present, MapFlags::ANY)
                .map_err(map_err(format!("adding interface {ifindex} to sl_ifaces")))?;
        }
        self.slots
            .update(&next.to_ne_bytes(), &encode_slot(policy), MapFlags::ANY)
            .map_err(map_err(format!("writing slot {next} of sl_slots")))?;
        // The switch: from here on new connections see the new policy.
        self.active
            .update(&0u32.to_ne_bytes(), &next.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err("activating the new policy in sl_active"))
    }

    /// The active policy.
    pub fn read(&self) -> Result<Encoded, Error> {
        let slot = self.active_slot()?;
        let value = self
            .slots
            .lookup(&slot.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err("reading sl_slots"))?
            .ok_or_else(|| Error::Corrupt(format!("sl_slots has no entry {slot}")))?;
        let mut policy = decode_slot(&value)?;
        for key in self.cidr_v4.keys() {
            if key.len() == CIDR4_KEY_SIZE && u32_at(&key, 4) == slot {
                policy.exclude_cidrs.push(decode_cidr4(&key)?);
            }
        }
        for key in self.cidr_v6.keys() {
            if key.len() == CIDR6_KEY_SIZE && u32_at(&key, 4) == slot {
                policy.exclude_cidrs.push(decode_cidr6(&key)?);
            }
        }
        policy.exclude_cidrs.sort();
        for key in self.ifaces.keys() {
            if key.len() == IFACE_KEY_SIZE && u32_at(&key, 0) == slot {
                policy.exclude_ifindexes.insert(u32_at(&key, 4));
            }
        }
        Ok(policy)
    }

    /// Puts a listening socket at `index`; the map keeps its own reference,
    /// which the kernel drops when the socket closes.
    pub fn set_listener(&self, index: u32, socket: BorrowedFd<'_>) -> Result<(), Error> {
        let fd = u64::try_from(socket.as_raw_fd())
            .map_err(|_| Error::Corrupt("negative file descriptor".into()))?;
        self.listeners
            .update(&index.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err(format!(
                "putting the listener into sl_listeners[{index}]"
            )))
    }

    /// The socket cookie of the listener at `index`, if there is one.
    pub fn listener_cookie(&self, index: u32) -> Result<Option<u64>, Error> {
        let value = self
            .listeners
            .lookup(&index.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err(format!("reading sl_listeners[{index}]")))?;
        Ok(value.map(|v| u64_at(&v, 0)))
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(word)
}

/// The slot a key of `map` belongs to: trie keys start with the prefix
/// length, then the slot; interface keys start with the slot.
fn slot_of(map: &str, key: &[u8]) -> u32 {
    if map == "sl_ifaces" {
        u32_at(key, 0)
    } else {
        u32_at(key, 4)
    }
}

fn encode_slot(policy: &Encoded) -> Vec<u8> {
    let mut value = vec![0u8; SLOT_SIZE];
    let flags = if policy.intercept_all {
        SLOT_INTERCEPT_ALL
    } else {
        0
    };
    value[..4].copy_from_slice(&flags.to_ne_bytes());
    set_bits(&mut value[INTERCEPT_OFFSET..EXCLUDE_OFFSET], &policy.ports);
    set_bits(&mut value[EXCLUDE_OFFSET..], &policy.exclude_ports);
    value
}

fn decode_slot(value: &[u8]) -> Result<Encoded, Error> {
    if value.len() != SLOT_SIZE {
        return Err(Error::Corrupt(format!(
            "a slot of sl_slots is {} bytes, sluice expects {SLOT_SIZE}: a different sluice version loaded it",
            value.len()
        )));
    }
    Ok(Encoded {
        intercept_all: u32_at(value, 0) & SLOT_INTERCEPT_ALL != 0,
        ports: bits(&value[INTERCEPT_OFFSET..EXCLUDE_OFFSET]),
        exclude_ports: bits(&value[EXCLUDE_OFFSET..]),
        ..Encoded::default()
    })
}

/// Bit `port % 64` of 64-bit word `port / 64`, words in native byte order
/// as the program reads them.
fn set_bits(words: &mut [u8], ports: &BTreeSet<u16>) {
    for &port in ports {
        let word = usize::from(port / 64);
        let mut value = u64_at(words, word * 8);
        value |= 1 << (port % 64);
        words[word * 8..word * 8 + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

fn bits(words: &[u8]) -> BTreeSet<u16> {
    (0..=u16::MAX)
        .filter(|port| {
            let word = u64_at(words, usize::from(port / 64) * 8);
            word >> (port % 64) & 1 == 1
        })
        .collect()
}

fn cidr4_key(slot: u32, net: &Ipv4Net) -> Vec<u8> {
    let mut key = Vec::with_capacity(CIDR4_KEY_SIZE);
    key.extend_from_slice(&(SLOT_PREFIX_BITS + u32::from(net.prefix_len())).to_ne_bytes());
    key.extend_from_slice(&slot.to_ne_bytes());
    key.extend_from_slice(&net.network().octets());
    key
}

fn cidr6_key(slot: u32, net: &Ipv6Net) -> Vec<u8> {
    let mut key = Vec::with_capacity(CIDR6_KEY_SIZE);
    key.extend_from_slice(&(SLOT_PREFIX_BITS + u32::from(net.prefix_len())).to_ne_bytes());
    key.extend_from_slice(&slot.to_ne_bytes());
    key.extend_from_slice(&net.network().octets());
    key
}

fn iface_key(slot: u32, ifindex: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(IFACE_KEY_SIZE);
    key.extend_from_slice(&slot.to_ne_bytes());
    key.extend_from_slice(&ifindex.to_ne_bytes());
    key
}

fn prefix_len(key: &[u8], max: u32) -> Result<u8, Error> {
    u32_at(key, 0)
        .checked_sub(SLOT_PREFIX_BITS)
        .filter(|len| *len <= max)
        .and_then(|len| u8::try_from(len).ok())
        .ok_or_else(|| Error::Corrupt(format!("a CIDR key has prefix length {}", u32_at(key, 0))))
}

fn decode_cidr4(key: &[u8]) -> Result<IpNet, Error> {
    let mut octets = [0; 4];
    octets.copy_from_slice(&key[8..12]);
    let len = prefix_len(key, 32)?;
    Ipv4Net::new(Ipv4Addr::from(octets), len)
        .map(IpNet::V4)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

fn decode_cidr6(key: &[u8]) -> Result<IpNet, Error> {
    let mut octets = [0; 16];
    octets.copy_from_slice(&key[8..24]);
    let len = prefix_len(key, 128)?;
    Ipv6Net::new(Ipv6Addr::from(octets), len)
        .map(IpNet::V6)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_bitmaps_round_trip() {
        let policy = Encoded {
            intercept_all: false,
            ports: BTreeSet::from([1, 63, 64, 80, 9080, 65535]),
            exclude_ports: BTreeSet::from([15006, 15020]),
            ..Encoded::default()
        };
        let slot = encode_slot(&policy);
        assert_eq!(slot.len(), SLOT_SIZE);
        // Port 64 is bit 0 of word 1, as the C side computes it.
        assert_eq!(u64_at(&slot, INTERCEPT_OFFSET + 8) & 1, 1);
        assert_eq!(u64_at(&slot, INTERCEPT_OFFSET) >> 63, 1);
        assert_eq!(decode_slot(&slot).unwrap(), policy);
        let all = Encoded {
            intercept_all: true,
            ..Encoded::default()
        };
        assert_eq!(decode_slot(&encode_slot(&all)).unwrap(), all);
    }

    #[test]
    fn cidr_keys_match_all_address_bits_after_the_slot() {
        let net: Ipv4Net = "198.18.0.8/29".parse().unwrap();
        let key = cidr4_key(1, &net);
        assert_eq!(key.len(), CIDR4_KEY_SIZE);
        assert_eq!(u32_at(&key, 0), 32 + 29);
        assert_eq!(slot_of("sl_cidr_v4", &key), 1);
        assert_eq!(&key[8..], &[198, 18, 0, 8]);
        assert_eq!(decode_cidr4(&key).unwrap(), IpNet::V4(net));
        let net6: Ipv6Net = "2001:2::8/125".parse().unwrap();
        let key6 = cidr6_key(0, &net6);
        assert_eq!((key6.len(), u32_at(&key6, 0)), (CIDR6_KEY_SIZE, 32 + 125));
        assert_eq!(decode_cidr6(&key6).unwrap(), IpNet::V6(net6));
        assert_eq!(slot_of("sl_ifaces", &iface_key(1, 7)), 1);
    }

    #[test]
    fn corrupt_keys_are_refused() {
        let mut key = cidr4_key(0, &"10.0.0.0/8".parse().unwrap());
        key[..4].copy_from_slice(&(32u32 + 33).to_ne_bytes());
        assert!(decode_cidr4(&key).is_err());
        key[..4].copy_from_slice(&7u32.to_ne_bytes());
        assert!(decode_cidr4(&key).is_err());
        assert!(decode_slot(&[0; 8]).is_err());
    }
}
