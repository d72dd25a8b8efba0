//! `process_*` metrics, as every Prometheus client library names them, read
//! from `/proc/self` when Prometheus scrapes (Linux; elsewhere none).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::counter::ConstCounter;

use super::gauge;

/// What `/proc/self/stat` says of the process.
#[derive(Debug, Default, PartialEq)]
pub struct Stat {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time, in clock ticks after boot.
    pub start_ticks: u64,
    pub threads: u64,
    pub virtual_bytes: u64,
    pub resident_pages: u64,
}

/// Parses `/proc/self/stat`: fields after the command name (which is in
/// parentheses and may hold spaces and parentheses itself).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field n of proc(5) is fields[n - 3] here (state is field 3).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.saturating_add(field(15)?),
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time `/proc/stat` gives (`btime`), in seconds since the epoch.
pub fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|t| t.trim().parse().ok())
}

/// The soft limit on open files `/proc/self/limits` gives.
pub fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `process_*` metrics of this process.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            return Ok(());
        };
        let (ticks, page) = system_units();
        let cpu = ConstCounter::new(stat.cpu_ticks as f64 / ticks.max(1) as f64);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.resident_pages.saturating_mul(page) as f64,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.virtual_bytes as f64,
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process.",
            stat.threads as f64,
        )?;
        if let Some(boot) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_boot_time(&t))
        {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.start_ticks as f64 / ticks.max(1) as f64,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                fds.count() as f64,
            )?;
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| parse_max_fds(&t))
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max as f64,
            )?;
        }
        Ok(())
    }
}

/// The free bytes (for an unprivileged user) and the size of the file
/// system holding `path`; none when it cannot be asked.
pub fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a NUL-terminated string that outlives the call;
        // statvfs fills `stat` and returns 0, or returns -1 and leaves it.
        let filled = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } == 0;
        if !filled {
            return None;
        }
        // SAFETY: statvfs returned 0, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        // The fields are C unsigned longs: u64 here, u32 on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        let (block, available, blocks) = (
            u64::from(stat.f_frsize),
            u64::from(stat.f_bavail),
            u64::from(stat.f_blocks),
        );
        Some((
            available.saturating_mul(block),
            blocks.saturating_mul(block),
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Clock ticks per second and the page size.
fn system_units() -> (u64, u64) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a constant of the system; no memory is shared.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (
            u64::try_from(ticks).unwrap_or(100),
            u64::try_from(page).unwrap_or(4096),
        )
    }
    #[cfg(not(unix))]
    {
        (100, 4096)
    }
}
