//! Memory limits: every output and workspace an operator allocates is sized with checked arithmetic
//! and compared with a limit *before* it is allocated, so a small input that asks for a huge output
//! (a long G or T) is an [`Error::Memory`] naming the tensor, its shape and the bytes it needs,
//! never an allocation abort.
//!
//! The limit is a [`MemoryLimit`]:
//! - [`MemoryLimit::Available`] (the default): what this process can still get, the smallest of
//!   `MemAvailable` (`/proc/meminfo`), the cgroup's `memory.max - memory.current`, and the headroom
//!   left by `RLIMIT_AS` and `RLIMIT_DATA` (`/proc/self/limits` against `/proc/self/status`).
//!   Where none of these can be read (not Linux), only the overflow checks apply. Requests under
//!   16 MiB in all are not compared with it (reading `/proc` on every small call costs more than it
//!   saves).
//! - [`MemoryLimit::Bytes`]: a fixed number of bytes per call (outputs plus workspaces).
//! - [`MemoryLimit::Unlimited`]: only overflow of the size arithmetic is an error.
//!
//! Where the limit comes from, innermost first: a [`with_limit`] scope on this thread (the `named`
//! interface opens one for its `RunOptions::memory_limit`), else the process-wide
//! [`set_limit`], else [`MemoryLimit::Available`]. The `camex` CLI sets it with `--max-memory`.
//!
//! The CUDA operators compare their device allocations with the free device memory
//! (`cuMemGetInfo`) and with a [`MemoryLimit::Bytes`] limit, if one is set.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::fmt;
use std::sync::Mutex;

/// How much memory one operator call may allocate. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLimit {
    /// What the machine (and this process's cgroup and rlimits) can still give.
    #[default]
    Available,
    /// At most this many bytes per call.
    Bytes(u64),
    /// No limit; sizes are still checked for overflow.
    Unlimited,
}

impl MemoryLimit {
    /// Parses `available`, `unlimited`, or a byte count with an optional binary suffix:
    /// `1000000`, `512K`, `512M`, `4G`, `1T` (also `KiB`, `MiB`, `GiB`, `TiB`; case-insensitive).
    pub fn parse(s: &str) -> Result<MemoryLimit> {
        let bad = || {
            Error::option(
                "max-memory",
                format!("expected available|unlimited|BYTES[K|M|G|T], got `{s}`"),
            )
        };
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "available" => return Ok(MemoryLimit::Available),
            "unlimited" => return Ok(MemoryLimit::Unlimited),
            _ => {}
        }
        let t = t
            .strip_suffix("ib")
            .or_else(|| t.strip_suffix('b'))
            .unwrap_or(&t);
        let (num, shift) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 10),
            Some('m') => (&t[..t.len() - 1], 20),
            Some('g') => (&t[..t.len() - 1], 30),
            Some('t') => (&t[..t.len() - 1], 40),
            _ => (t, 0),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
        Ok(MemoryLimit::Bytes(bytes))
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimit::Available => write!(f, "available"),
            MemoryLimit::Bytes(b) => write!(f, "{b}"),
            MemoryLimit::Unlimited => write!(f, "unlimited"),
        }
    }
}

impl std::str::FromStr for MemoryLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MemoryLimit::parse(s)
    }
}

static PROCESS_LIMIT: Mutex<Option<MemoryLimit>> = Mutex::new(None);

thread_local! {
    static SCOPED_LIMIT: Cell<Option<MemoryLimit>> = const { Cell::new(None) };
}

/// Sets the process-wide limit (used where no [`with_limit`] scope is open).
pub fn set_limit(limit: MemoryLimit) {
    *PROCESS_LIMIT.lock().unwrap_or_else(|e| e.into_inner()) = Some(limit);
}

/// The limit in force on this thread.
pub fn limit() -> MemoryLimit {
    SCOPED_LIMIT
        .with(|c| c.get())
        .or_else(|| *PROCESS_LIMIT.lock().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default()
}

/// Runs `f` with `limit` in force on this thread (operator calls made by `f` on this thread are
/// checked against it); the previous limit is restored afterwards, also on panic.
pub fn with_limit<R>(limit: MemoryLimit, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<MemoryLimit>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED_LIMIT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SCOPED_LIMIT.with(|c| c.replace(Some(limit))));
    f()
}

/// Bytes this process can still allocate, and which bound gives that number; `None` where no bound
/// can be read.
pub fn available() -> Option<(u64, String)> {
    let mut best: Option<(u64, String)> = None;
    let mut offer = |bytes: u64, what: String| {
        if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
            best = Some((bytes, what));
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(kb) = kb_field(&meminfo, "MemAvailable:") {
        let b = kb.saturating_mul(1024);
        offer(b, format!("MemAvailable {}", human(b as u128)));
    }
    if let Some((b, what)) = cgroup_headroom() {
        offer(b, what);
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for (row, used_field, name) in [
        ("Max address space", "VmSize:", "RLIMIT_AS"),
        ("Max data size", "VmData:", "RLIMIT_DATA"),
    ] {
        if let Some(lim) = soft_limit(&limits, row) {
            let used = kb_field(&status, used_field)
                .unwrap_or(0)
                .saturating_mul(1024);
            offer(
                lim.saturating_sub(used),
                format!(
                    "{name} {} with {} in use",
                    human(lim as u128),
                    human(used as u128)
                ),
            );
        }
    }
    best
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft limit of a `/proc/self/limits` row, `None` when unlimited or absent.
fn soft_limit(limits: &str, row: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with(row))?;
    line[row.len()..].split_whitespace().next()?.parse().ok()
}

/// cgroup v2: `memory.max - memory.current` of this process's cgroup.
fn cgroup_headroom() -> Option<(u64, String)> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = format!("/sys/fs/cgroup{}", path.trim_end());
    let max: u64 = std::fs::read_to_string(format!("{dir}/memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cur: u64 = std::fs::read_to_string(format!("{dir}/memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((
        max.saturating_sub(cur),
        format!(
            "cgroup memory.max {} with {} in use",
            human(max as u128),
            human(cur as u128)
        ),
    ))
}

/// `1.5 GiB`-style size.
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One buffer of a request: a named tensor (or workspace), its shape and its element size.
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub elem_bytes: usize,
}

/// Shorthand for a [`Need`].
pub fn need<'a>(name: &'a str, shape: &'a [usize], elem_bytes: usize) -> Need<'a> {
    Need {
        name,
        shape,
        elem_bytes,
    }
}

/// Bytes of one buffer, `None` when the arithmetic overflows u128.
pub fn bytes_of(shape: &[usize], elem_bytes: usize) -> Option<u128> {
    shape
        .iter()
        .try_fold(elem_bytes as u128, |acc, &d| acc.checked_mul(d as u128))
}

/// Below this many bytes in all, [`MemoryLimit::Available`] is not consulted.
const SMALL: u128 = 16 << 20;

/// Checks that the buffers of one call can be allocated: every size with checked arithmetic, each
/// one addressable (at most `isize::MAX` bytes), and their total within the [`limit`] in force.
/// Errors with [`Error::Memory`] naming the largest buffer (or the one whose size overflows).
pub fn check(needs: &[Need<'_>]) -> Result<()> {
    check_against(needs, limit(), None)
}

/// [`check`] against an explicit limit and, when given, a device's free memory (bytes, and the
/// message's ending when the request is over it), for the CUDA operators.
pub fn check_against(
    needs: &[Need<'_>],
    limit: MemoryLimit,
    device_free: Option<(u64, String)>,
) -> Result<()> {
    let mut total: Option<u128> = Some(0);
    let mut largest: Option<(usize, u128)> = None;
    for (k, nd) in needs.iter().enumerate() {
        let b = bytes_of(nd.shape, nd.elem_bytes);
        match b {
            Some(b) if b <= isize::MAX as u128 => {
                total = total.and_then(|t| t.checked_add(b));
                if largest.is_none_or(|(_, l)| b > l) {
                    largest = Some((k, b));
                }
            }
            _ => {
                return Err(memory_error(
                    nd,
                    b,
                    None,
                    "more than this machine can address".into(),
                ))
            }
        }
    }
    let (Some(total), Some((k, b))) = (total, largest) else {
        return Ok(());
    };
    const RAISE: &str = "raise it with --max-memory (CLI), RunOptions::memory_limit or \
                         camex::memory::set_limit";
    let bound: Option<(u64, String)> = match limit {
        MemoryLimit::Unlimited => None,
        MemoryLimit::Bytes(l) => Some((
            l,
            format!(
                "over the memory limit of {l} bytes ({}); {RAISE}",
                human(l as u128)
            ),
        )),
        MemoryLimit::Available if total < SMALL || device_free.is_some() => None,
        MemoryLimit::Available => available().map(|(l, what)| {
            (
                l,
                format!(
                    "over the {l} bytes ({}) this process can still allocate ({what}); \
                     set a limit with --max-memory (CLI), RunOptions::memory_limit or \
                     camex::memory::set_limit",
                    human(l as u128)
                ),
            )
        }),
    };
    for (l, over) in bound.into_iter().chain(device_free) {
        if total > l as u128 {
            return Err(memory_error(&needs[k], Some(b), Some(total), over));
        }
    }
    Ok(())
}

fn memory_error(nd: &Need<'_>, bytes: Option<u128>, total: Option<u128>, limit: String) -> Error {
    Error::Memory {
        tensor: nd.name.to_string(),
        shape: nd.shape.to_vec(),
        bytes: bytes.and_then(|b| u64::try_from(b).ok()),
        total: total.and_then(|b| u64::try_from(b).ok()),
        limit,
    }
}

/// A `Vec` of `n` copies of `v`, allocated fallibly (`try_reserve_exact`): for sizes that come
/// from data. The error names `what` and its shape.
pub fn try_vec<T: Clone>(what: &str, shape: &[usize], n: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    try_reserve(&mut out, what, shape, n)?;
    out.resize(n, v);
    Ok(out)
}

/// `out.try_reserve_exact(n)`, as an [`Error::Memory`] naming `what` and its shape.
pub fn try_reserve<T>(out: &mut Vec<T>, what: &str, shape: &[usize], n: usize) -> Result<()> {
    out.try_reserve_exact(n).map_err(|e| Error::Memory {
        tensor: what.to_string(),
        shape: shape.to_vec(),
        bytes: (n as u64).checked_mul(std::mem::size_of::<T>() as u64),
        total: None,
        limit: format!("the allocator refused it ({e})"),
    })
}

/// Asks the kernel for transparent huge pages on the 2 MiB-aligned part of a large, freshly
/// allocated buffer. Large host buffers are fresh mappings on every call, so each 4 KiB page of
/// them costs a fault on first touch: a [16, 2048, 512] f32 output is 16,384 faults. With
/// `transparent_hugepage` set to `madvise` (a common default) the same buffer takes 32. It helps
/// the pages nothing has touched yet: a zero-filled `vec!` comes untouched from `calloc`, a buffer
/// filled with another value is touched already (khugepaged may still merge it later). A hint
/// only: where it is refused or unsupported nothing changes.
pub(crate) fn huge_pages<T>(data: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(data);
        if bytes < 2 * HUGE {
            return;
        }
        let start = data.as_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `data`'s allocation, and MADV_HUGEPAGE only changes
            // how the kernel backs those pages, never their contents.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_limits() {
        assert_eq!(
            MemoryLimit::parse("4G").unwrap(),
            MemoryLimit::Bytes(4 << 30)
        );
        assert_eq!(
            MemoryLimit::parse("512MiB").unwrap(),
            MemoryLimit::Bytes(512 << 20)
        );
        assert_eq!(
            MemoryLimit::parse("1000").unwrap(),
            MemoryLimit::Bytes(1000)
        );
        assert_eq!(
            MemoryLimit::parse("available").unwrap(),
            MemoryLimit::Available
        );
        assert_eq!(
            MemoryLimit::parse("unlimited").unwrap(),
            MemoryLimit::Unlimited
        );
        assert!(MemoryLimit::parse("-1").is_err());
        assert!(MemoryLimit::parse("99999999999T").is_err());
        assert!(MemoryLimit::parse("lots").is_err());
    }

    #[test]
    fn overflow_and_limit() {
        let huge = [usize::MAX, usize::MAX, 4];
        let e =
            check_against(&[need("merged", &huge, 4)], MemoryLimit::Unlimited, None).unwrap_err();
        assert!(e.to_string().contains("merged"), "{e}");
        let e = check_against(
            &[need("y", &[1 << 20, 1 << 20], 4)],
            MemoryLimit::Bytes(1 << 30),
            None,
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("`y`") && m.contains("[1048576, 1048576]") && m.contains("4398046511104"),
            "{m}"
        );
        check_against(
            &[need("y", &[16, 16], 4)],
            MemoryLimit::Bytes(1 << 30),
            None,
        )
        .unwrap();
        with_limit(MemoryLimit::Bytes(10), || {
            assert_eq!(limit(), MemoryLimit::Bytes(10));
            assert!(check(&[need("y", &[16], 4)]).is_err());
        });
        assert_ne!(limit(), MemoryLimit::Bytes(10));
    }
}
