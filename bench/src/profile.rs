//! How big and how long each load is, per profile.

use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::load::{bulk, crr, exhaust, hold, redis, rr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// Seconds in total: proves the pipeline works (the smoke test).
    Smoke,
    /// About four minutes on two cores.
    Quick,
    /// About twenty minutes on two cores: the committed results.
    Default,
    /// `make bench-check`: a few minutes on two cores, several short rounds
    /// so that one disturbed moment weighs little.
    Check,
}

impl std::fmt::Display for ProfileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.to_possible_value().ok_or(std::fmt::Error)?;
        f.write_str(value.get_name())
    }
}

/// The loads, in the order they run in each scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    Concurrency,
    Rr,
    Bulk,
    Crr,
    /// redis-benchmark against redis-server, keep-alive and `-k 0`.
    Redis,
    /// Last: it fills and flushes the pod's conntrack table.
    Exhaustion,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: ProfileName,
    /// The loads this run makes (all, unless `--loads` chose fewer).
    pub loads: Vec<LoadKind>,
    pub rr: rr::Params,
    pub crr: crr::Params,
    pub bulk: Vec<bulk::Params>,
    pub hold: hold::Params,
    pub exhaustion: exhaust::Params,
    /// The redis load's runs: keep-alive, then a connection per request.
    pub redis: Vec<redis::Params>,
    /// Timed loads (RR, bulk, CRR, redis) run this many times per scenario,
    /// the scenarios taking turns; the durations above are per round.
    pub rounds: u32,
    /// Before each load, how long to wait for other processes to leave the
    /// machine alone.
    pub quiet_wait: Duration,
    /// Tries per load: a disturbed load is repeated until this many.
    pub attempts: u32,
    /// All the waiting and repeating of a run together: beyond it, loads run
    /// at once and disturbed ones are kept (and marked).
    pub wait_budget: Duration,
    /// After the timed rounds, count each interceptor's syscalls over a CRR
    /// and an RR pass of their own. Off for the timed runs of
    /// `bench-check`'s A/B, which count them in runs of their own.
    pub syscalls: bool,
    /// sluice's user-space instructions per connection: after everything
    /// else, each sluice scenario is started again under callgrind for a
    /// CRR pass of one client (`callgrind.rs`).
    pub instructions: bool,
}

impl Profile {
    pub fn new(name: ProfileName) -> Profile {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        match name {
            ProfileName::Smoke => Profile {
                name,
                loads: all_loads(),
                rr: rr::Params {
                    connections: 2,
                    rate: 400.0,
                    duration: ms(700),
                    warmup: 5,
                },
                crr: crr::Params {
                    clients: 2,
                    duration: ms(500),
                },
                bulk: bulk_params(ms(400)),
                hold: hold::Params {
                    connections: 200,
                    steps: 4,
                    hold: ms(300),
                    parallel: 64,
                },
                exhaustion: exhaust::Params {
                    free: 64,
                    connections: 256,
                    parallel: 256,
                },
                redis: redis_params(30_000, 4_000, s(20)),
                rounds: 1,
                quiet_wait: Duration::ZERO,
                attempts: 1,
                wait_budget: Duration::ZERO,
                syscalls: true,
                instructions: false,
            },
            ProfileName::Quick => Profile {
                name,
                loads: all_loads(),
                rr: rr::Params {
                    connections: 16,
                    rate: 4000.0,
                    duration: ms(2500),
                    warmup: 50,
                },
                crr: crr::Params {
                    clients: 8,
                    duration: ms(1500),
                },
                bulk: bulk_params(ms(1250)),
                hold: hold::Params {
                    connections: 2000,
                    steps: 5,
                    hold: s(1),
                    parallel: 128,
                },
                exhaustion: exhaust::Params {
                    free: 256,
                    connections: 1024,
                    parallel: 512,
                },
                redis: redis_params(80_000, 12_000, s(30)),
                rounds: 2,
                quiet_wait: s(10),
                attempts: 2,
                wait_budget: s(30),
                syscalls: true,
                instructions: false,
            },
            ProfileName::Default => Profile {
                name,
                loads: all_loads(),
                rr: rr::Params {
                    connections: 32,
                    rate: 8000.0,
                    duration: s(8),
                    warmup: 100,
                },
                crr: crr::Params {
                    clients: 16,
                    duration: s(5),
                },
                bulk: bulk_params(s(4)),
                hold: hold::Params {
                    connections: 10_000,
                    steps: 10,
                    hold: s(3),
                    parallel: 256,
                },
                exhaustion: exhaust::Params {
                    free: 1024,
                    connections: 4096,
                    parallel: 1024,
                },
                redis: redis_params(150_000, 25_000, s(60)),
                rounds: 3,
                quiet_wait: s(60),
                attempts: 3,
                wait_budget: s(360),
                syscalls: true,
                instructions: false,
            },
            ProfileName::Check => Profile {
                name,
                // Exhaustion fills and empties a 262,144-entry table per
                // scenario; the concurrency load already holds tproxy and
                // ebpf to exactly 0 conntrack entries.
                loads: vec![
                    LoadKind::Concurrency,
                    LoadKind::Rr,
                    LoadKind::Bulk,
                    LoadKind::Crr,
                ],
                rr: rr::Params {
                    connections: 16,
                    rate: 4000.0,
                    duration: s(2),
                    warmup: 50,
                },
                crr: crr::Params {
                    clients: 8,
                    duration: ms(1500),
                },
                bulk: bulk_params(s(1)),
                // Conntrack and memory per connection need no more: the
                // conntrack count is exact, and 1,000 connections put a
                // 1 KiB-per-connection regression at 1 MiB of RSS.
                hold: hold::Params {
                    connections: 1000,
                    steps: 4,
                    hold: ms(500),
                    parallel: 128,
                },
                exhaustion: exhaust::Params {
                    free: 64,
                    connections: 256,
                    parallel: 256,
                },
                // Not run (see loads): redis-benchmark's figures are
                // redis's as much as sluice's, and a Debian update of redis
                // would move them with no change here.
                redis: redis_params(80_000, 12_000, s(30)),
                rounds: 3,
                // CI must end: a short wait for quiet, one repeat, and a
                // budget that caps both.
                quiet_wait: s(10),
                attempts: 2,
                wait_budget: s(60),
                syscalls: true,
                instructions: false,
            },
        }
    }

    pub fn runs(&self, load: LoadKind) -> bool {
        self.loads.contains(&load)
    }

    /// The most connections any load of this run holds at once
    /// (RLIMIT_NOFILE, HAProxy's maxconn).
    pub fn max_connections(&self) -> usize {
        let bulk = self.bulk.iter().map(|b| b.streams).max().unwrap_or(0);
        let redis = self.redis.iter().map(|r| r.clients).max().unwrap_or(0);
        [
            (LoadKind::Concurrency, self.hold.connections),
            (LoadKind::Exhaustion, self.exhaustion.connections),
            (LoadKind::Rr, self.rr.connections),
            (LoadKind::Crr, self.crr.clients),
            (LoadKind::Bulk, bulk),
            (LoadKind::Redis, redis),
        ]
        .into_iter()
        .filter(|(load, _)| self.runs(*load))
        .map(|(_, connections)| connections)
        .max()
        .unwrap_or(0)
    }
}

fn all_loads() -> Vec<LoadKind> {
    LoadKind::value_variants().to_vec()
}

fn bulk_params(duration: Duration) -> Vec<bulk::Params> {
    [1, 4]
        .map(|streams| bulk::Params { streams, duration })
        .to_vec()
}

/// redis-benchmark, keep-alive (50 clients) and a connection per request
/// (20 clients): `keepalive` and `per_connection` requests. Through an
/// interceptor on two cores they go at some 30,000 and 5,000 requests/s, so
/// the counts are about one second per 30,000 and 5,000. Past `limit` a
/// run has stalled.
fn redis_params(keepalive: u64, per_connection: u64, limit: Duration) -> Vec<redis::Params> {
    vec![
        redis::Params {
            keepalive: true,
            clients: 50,
            requests: keepalive,
            limit,
        },
        redis::Params {
            keepalive: false,
            clients: 20,
            requests: per_connection,
            limit,
        },
    ]
}
