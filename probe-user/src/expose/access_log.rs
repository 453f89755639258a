//! `--access-log`: one JSON line per request, fed by the kernel's access ring. Each record
//! holds only tokens and numbers (method, status code, protocol, duration, byte counts).

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use probe_common::{
    ACCESS_POLL_MS, AccessRecord,
    http::{METHODS, PROTOCOLS, name_of},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::MissedTickBehavior,
};

use crate::{error::StartError, kernel::ring::decode};

pub type Sink = Box<dyn Write + Send>;

/// `-` is stdout; anything else a file, appended to.
pub fn open(path: &Path) -> Result<Sink, StartError> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdout()));
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| StartError::AccessLog {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Box::new(BufWriter::new(file)))
}

pub async fn pump(ring: RingBuf<MapData>, mut sink: Sink) -> io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
    let clock = Clock::new();
    // The socket hooks' start-up self-test is flyprobe serving itself: not a request.
    let me = std::process::id();
    // A failing log (disk full, a closed pipe) must not take the metrics down: records are
    // dropped, and that is said once, until writing works again.
    let mut failing = false;
    // The kernel wakes this task only when a quarter of the ring is waiting; the timer
    // drains what a quiet server left there.
    let mut tick = tokio::time::interval(Duration::from_millis(ACCESS_POLL_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Readiness is cleared before draining: a record that lands meanwhile wakes again
        // (or waits for the next tick).
        tokio::select! {
            guard = ring.readable_mut() => guard?.clear_ready(),
            _ = tick.tick() => {}
        }
        let ring = ring.get_mut();
        let mut result = Ok(());
        while let Some(item) = ring.next() {
            if let Some(record) = decode::<AccessRecord>(&item)
                && record.tgid != me
                && result.is_ok()
            {
                result = writeln!(sink, "{}", line(&record, clock.wall(record.ts_ns)));
            }
        }
        match result.and_then(|()| sink.flush()) {
            Err(err) if !failing => {
                log::warn!(
                    "access log write failed ({err}); dropping records until it works again"
                );
                failing = true;
            }
            Ok(()) if failing => {
                log::info!("access log writes work again");
                failing = false;
            }
            _ => {}
        }
    }
}

fn line(r: &AccessRecord, ts: SystemTime) -> String {
    serde_json::json!({
        "ts": humantime::format_rfc3339_micros(ts).to_string(),
        "pid": r.tgid,
        "method": name_of(&METHODS, r.method),
        "status": r.status,
        "protocol": name_of(&PROTOCOLS, r.protocol),
        "duration_us": r.duration_ns / 1_000,
        "bytes_in": r.rx,
        "bytes_out": r.tx,
    })
    .to_string()
}

/// Maps the kernel's monotonic timestamps to wall-clock time.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn new() -> Self {
        let mono = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::from(t).as_nanos() as u64)
            .unwrap_or(0);
        Self {
            wall: SystemTime::now(),
            mono_ns: mono,
        }
    }

    fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns >= self.mono_ns {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        } else {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_of_tokens_and_numbers() {
        let r = AccessRecord {
            ts_ns: 0,
            duration_ns: 1_234_567,
            rx: 78,
            tx: 160,
            tgid: 42,
            status: 404,
            method: 1,
            protocol: 1,
        };
        let ts = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v: serde_json::Value = serde_json::from_str(&line(&r, ts)).unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["status"], 404);
        assert_eq!(v["protocol"], "http1");
        assert_eq!(v["duration_us"], 1234);
        assert_eq!(
            (v["bytes_in"].as_u64(), v["bytes_out"].as_u64()),
            (Some(78), Some(160))
        );
        assert_eq!(v["ts"], "2023-11-14T22:13:20.000000Z");
    }
}
