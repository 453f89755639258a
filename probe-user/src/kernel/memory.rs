//! Kernel memory of flyprobe's maps. Two figures:
//! - the bound: what the maps can take at most, from their definitions (sizes, limits, the
//!   number of possible CPUs). Logged at start; a unit test keeps the DaemonSet's memory limit
//!   above it on a 64-CPU node, since the kernel charges map memory to the pod's cgroup.
//! - the use: the kernel's own figure for each map (`memlock` in /proc/self/fdinfo, which
//!   counts only the entries that exist for the maps that allocate on use), exported as
//!   `flyprobe_map_memory_bytes`.
//!
//! The formula, per map (x86_64, Linux 6.x; a hash entry's header is 48 bytes, a bucket 16):
//! - hash: buckets(next power of two of max) x 16 + max x (48 + key + value), key and value
//!   rounded up to 8;
//! - per-CPU hash: as a hash with an 8-byte value pointer, plus max x value x CPUs;
//! - array: max x value (x CPUs when per CPU); ring buffer: its size.

use std::{collections::BTreeMap, fs, mem::size_of, os::fd::AsRawFd as _};

use probe_common::{
    ACCESS_BYTES, ConnKey, ConnState, DISCOVERY_BYTES, DROPPED_ENTRIES, EVENTS_BYTES, ExitInfo,
    ListenKey, MAX_H2_CONNECTIONS, MAX_LISTEN_PORTS, MAX_PORT_STATS, MAX_STREAMS, PENDING_ENTRIES,
    PendingIo, PortStats, ProcStats, ReqKey, ReqStats, SslKey, Stream, StreamKey, TlsCall,
    drop_reason, h2::H2, names,
};

use crate::kernel::probe::Limits;

/// `struct htab_elem` before the key, and one hash bucket.
const HASH_ENTRY: u64 = 48;
const HASH_BUCKET: u64 = 16;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Hash,
    PerCpuHash,
    Array,
    PerCpuArray,
    Ring,
}

#[derive(Debug, Clone, Copy)]
pub struct MapBound {
    pub name: &'static str,
    kind: Kind,
    entries: u64,
    key: u64,
    value: u64,
}

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

impl MapBound {
    /// The most this map can take with `cpus` possible CPUs.
    pub fn bytes(&self, cpus: u64) -> u64 {
        let (n, key, value) = (self.entries, round8(self.key), round8(self.value));
        let buckets = n.next_power_of_two() * HASH_BUCKET;
        match self.kind {
            Kind::Hash => buckets + n * (HASH_ENTRY + key + value),
            Kind::PerCpuHash => buckets + n * (HASH_ENTRY + key + 8) + n * value * cpus,
            Kind::Array => n * value,
            Kind::PerCpuArray => n * value * cpus,
            Kind::Ring => n,
        }
    }
}

/// Every map of the kernel object, as the daemon sizes it (`pid_slots`: the target set's
/// length, the kernel's pid_max).
pub fn bounds(limits: &Limits, pid_slots: u32) -> Vec<MapBound> {
    let map = |name, kind, entries: u32, key: usize, value: usize| MapBound {
        name,
        kind,
        entries: u64::from(entries),
        key: key as u64,
        value: value as u64,
    };
    let ring = |name, bytes: u32| map(name, Kind::Ring, bytes, 0, 0);
    vec![
        map(names::TARGETS, Kind::Array, pid_slots, 4, 1),
        map(
            names::CONNS,
            Kind::Hash,
            limits.max_connections,
            size_of::<ConnKey>(),
            size_of::<ConnState>(),
        ),
        map(
            names::H2_CONNS,
            Kind::Hash,
            MAX_H2_CONNECTIONS,
            size_of::<ConnKey>(),
            size_of::<H2>(),
        ),
        // The HTTP/2 frame walks' program arrays: a program descriptor each.
        map(names::H2_WALK, Kind::Array, 2, 4, 4),
        map(names::FEXIT_RECV_WALK, Kind::Array, 1, 4, 4),
        map(names::FEXIT_SEND_WALK, Kind::Array, 1, 4, 4),
        map(names::FEXIT_SENDPAGE_WALK, Kind::Array, 1, 4, 4),
        map(names::DATA_WALKS, Kind::Array, 1, 4, 4),
        map(
            names::STREAMS,
            Kind::Hash,
            MAX_STREAMS,
            size_of::<StreamKey>(),
            size_of::<Stream>(),
        ),
        map(
            names::DROPPED,
            Kind::Hash,
            DROPPED_ENTRIES,
            size_of::<ConnKey>(),
            1,
        ),
        map(
            names::LISTEN_PORTS,
            Kind::Hash,
            MAX_LISTEN_PORTS,
            size_of::<ListenKey>(),
            1,
        ),
        map(
            names::PORT_STATS,
            Kind::PerCpuHash,
            MAX_PORT_STATS,
            size_of::<ListenKey>(),
            size_of::<PortStats>(),
        ),
        map(
            names::STATS,
            Kind::PerCpuHash,
            limits.max_processes,
            4,
            size_of::<ProcStats>(),
        ),
        map(
            names::PENDING_IO,
            Kind::Hash,
            PENDING_ENTRIES,
            8,
            size_of::<PendingIo>(),
        ),
        map(names::PENDING_ACCEPT, Kind::Hash, PENDING_ENTRIES, 8, 8),
        map(
            names::TLS_CALLS,
            Kind::Hash,
            limits.tls_entries().0,
            8,
            size_of::<TlsCall>(),
        ),
        map(
            names::SSL_CONNS,
            Kind::Hash,
            limits.tls_entries().1,
            size_of::<SslKey>(),
            size_of::<ConnKey>(),
        ),
        // The OpenSSL plaintext's HTTP/2 walks: two program descriptors.
        map(names::TLS_H2_WALK, Kind::Array, 2, 4, 4),
        map(names::TLS_WALKS, Kind::Array, 1, 4, 4),
        map(
            names::EXITS,
            Kind::Hash,
            limits.max_processes,
            4,
            size_of::<ExitInfo>(),
        ),
        map(names::LINEAGE, Kind::Hash, limits.max_processes, 4, 4),
        map(
            names::REQS,
            Kind::PerCpuHash,
            limits.max_request_series,
            size_of::<ReqKey>(),
            size_of::<ReqStats>(),
        ),
        map(names::DROPS, Kind::PerCpuArray, drop_reason::COUNT, 4, 8),
        ring(names::EVENTS, EVENTS_BYTES),
        ring(names::DISCOVERIES, DISCOVERY_BYTES),
        ring(names::ACCESS, ACCESS_BYTES),
    ]
}

/// The bound of all the maps together.
pub fn bound_bytes(bounds: &[MapBound], cpus: u64) -> u64 {
    bounds.iter().map(|b| b.bytes(cpus)).sum()
}

/// Possible CPUs: per-CPU maps hold a value for each, online or not.
pub fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1, |n| n as u64)
}

/// What each of this process's maps uses now, by name, as the kernel accounts it (`memlock`
/// in the map fd's fdinfo). Maps of one name (none today) are added up.
pub fn in_use(names_by_id: &mut BTreeMap<u32, String>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(fds) = fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in fds.filter_map(Result::ok) {
        let is_map = fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let id = id as u32;
        if !names_by_id.contains_key(&id)
            && let Some(name) = map_name(&fd.to_string_lossy())
        {
            names_by_id.insert(id, name);
        }
        if let Some(name) = names_by_id.get(&id) {
            *out.entry(name.clone()).or_default() += bytes;
        }
    }
    out
}

/// The name the kernel keeps for the map behind one of our fds (from a duplicate of it).
fn map_name(fd: &str) -> Option<String> {
    let fd: i32 = fd.parse().ok()?;
    // SAFETY: `fd` is open in this process (just listed); the duplicate is ours to own.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned().ok()?;
    debug_assert!(owned.as_raw_fd() != fd);
    let data = aya::maps::MapData::from_fd(owned).ok()?;
    let info = data.info().ok()?;
    info.name_as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use probe_common::{
        DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_REQUEST_SERIES, MAX_PID_SLOTS,
    };

    use super::*;

    fn defaults() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_processes: DEFAULT_MAX_PROCESSES,
            max_request_series: DEFAULT_MAX_REQUEST_SERIES,
            tls: true,
        }
    }

    /// `resources.limits.memory` of a manifest, in bytes (`256Mi`).
    fn limit_in(text: &str) -> u64 {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap();
        fn find(v: &serde_yaml_ng::Value) -> Option<String> {
            if let Some(m) = v.get("limits").and_then(|l| l.get("memory")) {
                return m.as_str().map(str::to_string);
            }
            match v {
                serde_yaml_ng::Value::Mapping(m) => m.values().find_map(find),
                serde_yaml_ng::Value::Sequence(s) => s.iter().find_map(find),
                _ => None,
            }
        }
        let limit = find(&value).expect("a memory limit");
        let mib: u64 = limit
            .strip_suffix("Mi")
            .expect("a limit in Mi")
            .parse()
            .unwrap();
        mib << 20
    }

    /// The daemon's own peak RSS with 10,000 connections was 8 MB (bench/results.md): the
    /// maps' bound plus that, with room to spare, must fit the pod's limit.
    const DAEMON_HEADROOM: u64 = 64 << 20;

    #[test]
    fn the_maps_fit_the_daemonsets_memory_limit_on_a_64_cpu_node() {
        let bound = bound_bytes(&bounds(&defaults(), MAX_PID_SLOTS), 64);
        eprintln!(
            "maps on a 64-CPU node with pid_max 4194304: {} MiB",
            bound >> 20
        );
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
        for manifest in ["kubernetes/daemonset.yaml", "helm/flyprobe/values.yaml"] {
            let text = fs::read_to_string(format!("{root}/{manifest}")).unwrap();
            // Multi-document manifests: the DaemonSet is the one with resources.
            let limit = text
                .split("\n---")
                .filter(|doc| doc.contains("limits:"))
                .map(limit_in)
                .next()
                .expect("a limit");
            assert!(
                bound + DAEMON_HEADROOM <= limit,
                "{manifest}: maps up to {} MiB + {} MiB for the daemon > limit {} MiB",
                bound >> 20,
                DAEMON_HEADROOM >> 20,
                limit >> 20
            );
        }
    }

    #[test]
    fn per_cpu_maps_grow_with_cpus_and_the_rest_does_not() {
        let b = bounds(&defaults(), 32_768);
        let (one, many) = (bound_bytes(&b, 1), bound_bytes(&b, 64));
        let per_cpu = (u64::from(DEFAULT_MAX_PROCESSES) * size_of::<ProcStats>() as u64)
            + (u64::from(DEFAULT_MAX_REQUEST_SERIES) * size_of::<ReqStats>() as u64)
            + (u64::from(MAX_PORT_STATS) * size_of::<PortStats>() as u64)
            + u64::from(drop_reason::COUNT) * 8;
        assert_eq!(many - one, 63 * per_cpu);
    }

    #[test]
    fn every_map_of_the_object_is_bounded() {
        // The maps the kernel object declares (globals live in .rodata and friends).
        let object = aya_obj::Object::parse(crate::kernel::probe::OBJECT).unwrap();
        let mut declared: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.'))
            .collect();
        declared.sort_unstable();
        let mut bounded: Vec<&str> = bounds(&defaults(), 32_768).iter().map(|b| b.name).collect();
        bounded.sort_unstable();
        assert_eq!(bounded, declared, "every map has a bound, and only maps do");
    }
}
