//! A network namespace's own TCP counters (`TcpExt` in /proc/<pid>/net/netstat, what
//! `nstat` shows), for what sock_diag cannot reach: listeners in other namespaces.

use std::fs;

/// `TcpExt: ListenDrops` of `pid`'s network namespace: every connection a listener there
/// dropped (its accept queue full, or its SYN queue full without cookies), counted once
/// each, since the namespace was created. None where the file cannot be read.
pub fn listen_drops(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?;
    counter(&text, "TcpExt:", "ListenDrops")
}

/// Counter `name` of group `group` in a netstat/snmp file: a line of names, then a line of
/// values, both starting with the group.
fn counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        if !names.starts_with(group) || !values.starts_with(group) {
            continue;
        }
        let at = names.split_whitespace().position(|n| n == name)?;
        return values.split_whitespace().nth(at)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 0 93 95 1234
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
";

    #[test]
    fn a_counter_is_read_by_its_name_in_its_group() {
        assert_eq!(counter(NETSTAT, "TcpExt:", "ListenDrops"), Some(95));
        assert_eq!(counter(NETSTAT, "TcpExt:", "ListenOverflows"), Some(93));
        assert_eq!(counter(NETSTAT, "IpExt:", "InTruncatedPkts"), Some(0));
        assert_eq!(counter(NETSTAT, "TcpExt:", "NoSuchCounter"), None);
        assert_eq!(counter(NETSTAT, "MPTcpExt:", "ListenDrops"), None);
        assert_eq!(
            counter("TcpExt: ListenDrops\n", "TcpExt:", "ListenDrops"),
            None
        );
    }

    #[test]
    fn this_process_s_namespace_has_the_counter() {
        assert!(listen_drops(std::process::id()).is_some());
    }
}
