//! The CPUs this process may run on: its affinity mask (`sched_getaffinity`), which
//! `taskset`, `docker --cpuset-cpus` and cgroup cpusets set; the cgroup's CPU quota
//! (`cpu.max`), which limits time but not placement; and pinning a thread to some of them.

use std::fmt;
use std::sync::OnceLock;

/// A set of CPUs, ascending, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuMask(Vec<usize>);

impl CpuMask {
    /// The set of `cpus` (sorted, duplicates dropped); CPU 0 alone when `cpus` is empty.
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Self {
        let mut v: Vec<usize> = cpus.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            v.push(0);
        }
        Self(v)
    }

    /// This process's mask, read once, on first use, from its main thread (whose thread id
    /// is the process id), so threads that pinned themselves since do not narrow it.
    /// `runner serve` reads it at start (the `shards` default, then the placement), before
    /// any shard starts.
    pub fn of_process() -> &'static CpuMask {
        static MASK: OnceLock<CpuMask> = OnceLock::new();
        MASK.get_or_init(|| {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            match affinity(pid) {
                Ok(cpus) => CpuMask::new(cpus),
                // Only a kernel without sched_getaffinity gets here; the machine's CPUs are
                // the best guess left.
                Err(e) => match glommio::CpuSet::online() {
                    Ok(online) => {
                        tracing::warn!(error = %e, "cannot read the process's CPU mask; taking the online CPUs");
                        CpuMask::new(online.iter().map(|l| l.cpu))
                    }
                    Err(e2) => {
                        tracing::warn!(error = %e, online = %e2, "cannot read the process's CPU mask nor the online CPUs; taking CPU 0");
                        CpuMask::new([0])
                    }
                },
            }
        })
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true (a mask holds at least one CPU); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }
}

/// The kernel's list format, as `Cpus_allowed_list` and `taskset -c` write it: `0-3,6,8-9`.
impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?
            } else {
                write!(f, "{start}-{end}")?
            }
            i += 1;
        }
        Ok(())
    }
}

/// The CPUs thread `tid` may run on. The buffer grows until it holds the kernel's mask, so
/// machines with more than 1,024 CPUs are read whole.
fn affinity(tid: libc::pid_t) -> std::io::Result<Vec<usize>> {
    let mut words = 16usize; // 1,024 CPUs
    loop {
        let mut buf = vec![0u64; words];
        let bytes = words * std::mem::size_of::<u64>();
        // SAFETY: the kernel writes at most `bytes` bytes into `buf`, which is that long;
        // `cpu_set_t` is a plain bit array, so a longer buffer of words is a valid argument.
        let rc = unsafe { libc::sched_getaffinity(tid, bytes, buf.as_mut_ptr().cast::<libc::cpu_set_t>()) };
        if rc == 0 {
            let bits = u64::BITS as usize;
            return Ok((0..words * bits).filter(|&c| buf[c / bits] & (1 << (c % bits)) != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) && words < 8_192 {
            words *= 2;
        } else {
            return Err(e);
        }
    }
}

/// Pins the calling thread to `cpus` (nothing to do when empty: it keeps the mask it
/// inherited).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let max = cpus.iter().copied().max().unwrap_or(0);
    let bits = u64::BITS as usize;
    let words = (max / bits + 1).max(16);
    let mut buf = vec![0u64; words];
    for &c in cpus {
        buf[c / bits] |= 1 << (c % bits);
    }
    // SAFETY: `buf` is `words` words long and the kernel reads only that many bytes.
    let rc = unsafe {
        libc::sched_setaffinity(0, words * std::mem::size_of::<u64>(), buf.as_ptr().cast::<libc::cpu_set_t>())
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Starts a thread named `name` pinned to `cpus` (unpinned when empty) running `f`, and
/// returns once it is pinned, or why it could not be (then `f` never runs).
pub fn spawn_on<F>(name: &str, cpus: Vec<usize>, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let wanted = show(&cpus);
    let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let pinned = pin_current_thread(&cpus);
        let ok = pinned.is_ok();
        let _ = tx.send(pinned);
        if ok {
            f();
        }
    })?;
    let failed = match rx.recv() {
        Ok(Ok(())) => return Ok(thread),
        Ok(Err(e)) => std::io::Error::new(e.kind(), format!("cannot pin the {name} thread to CPUs {wanted}: {e}")),
        Err(_) => std::io::Error::other(format!("the {name} thread ended before it was pinned")),
    };
    let _ = thread.join();
    Err(failed)
}

/// A CPU list as the kernel writes it (`0-3,6`), or `unpinned` for none.
pub fn show(cpus: &[usize]) -> String {
    if cpus.is_empty() { "unpinned".to_owned() } else { CpuMask::new(cpus.iter().copied()).to_string() }
}

/// The CPU time the process's cgroup may use, in CPUs (`cpu.max` of cgroup v2 — the least
/// along its ancestors — or `cpu.cfs_quota_us` / `cpu.cfs_period_us` of cgroup v1 at the
/// usual mount). `None` without a quota. Docker's `--cpus` and Swarm's `limits.cpus` set
/// it; it limits time, not the CPUs the process may run on.
pub fn cpu_quota() -> Option<f64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    quota_in(&cgroups, std::path::Path::new("/sys/fs/cgroup"))
}

/// The quota of the groups `cgroups` (`/proc/self/cgroup`'s text) names under `root`.
fn quota_in(cgroups: &str, root: &std::path::Path) -> Option<f64> {
    let mut least: Option<f64> = None;
    let mut take = |q: Option<f64>| {
        if let Some(q) = q {
            least = Some(least.map_or(q, |l| l.min(q)));
        }
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: the quota of this group and of every ancestor applies.
            let mut dir = root.join(path);
            loop {
                take(std::fs::read_to_string(dir.join("cpu.max")).ok().and_then(|s| parse_cpu_max(&s)));
                if !dir.pop() || !dir.starts_with(root) {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            for mount in ["cpu", "cpu,cpuacct"] {
                let dir = root.join(mount).join(path);
                let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
                if let (Some(quota), Some(period)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")) {
                    take(parse_cpu_max(&format!("{} {}", quota.trim(), period.trim())));
                    break;
                }
            }
        }
    }
    least
}

/// `"<quota> <period>"` (`max` or a negative quota: none) in CPUs.
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota: i64 = it.next()?.parse().ok()?;
    let period: i64 = it.next()?.parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_print_as_the_kernel_lists_them() {
        assert_eq!(CpuMask::new([1]).to_string(), "1");
        assert_eq!(CpuMask::new([0, 1]).to_string(), "0-1");
        assert_eq!(CpuMask::new([8, 0, 1, 2, 3, 6, 9]).to_string(), "0-3,6,8-9");
        assert_eq!(CpuMask::new([]).cpus(), &[0]);
    }

    #[test]
    fn quotas_read_as_cpus() {
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("-1 100000"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn the_least_quota_along_the_cgroups_ancestors_applies() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("swarm/task");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.path().join("swarm/cpu.max"), "300000 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(quota_in("0::/swarm/task\n", root.path()), Some(3.0));
        assert_eq!(quota_in("0::/\n", root.path()), None);
        // cgroup v1: the cpu controller's own hierarchy.
        let v1 = root.path().join("cpu,cpuacct/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(quota_in("4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n", root.path()), Some(0.5));
    }

    #[test]
    fn a_thread_pins_to_what_it_is_given_and_the_process_mask_stays() {
        let mask = CpuMask::of_process().clone();
        let cpu = *mask.cpus().last().unwrap();
        let t = spawn_on("pin-test", vec![cpu], move || {
            assert_eq!(affinity(0).unwrap(), vec![cpu]);
        })
        .unwrap();
        t.join().unwrap();
        // SAFETY: getpid has no preconditions.
        assert_eq!(CpuMask::new(affinity(unsafe { libc::getpid() }).unwrap()), mask);
    }
}
