//! Process-level guards for `check`: memory it can count on, an address-space cap so that an
//! impossible allocation fails instead of the process being killed, and standard output kept
//! for the report while the user's TorchScript code runs; and libraries opened at run time.

use std::ffi::{c_void, CStr, CString};
use std::io::{self, Write};

/// A library opened with `dlopen`, never closed: what is taken from it (functions, a
/// backend's registrations) lives as long as the process. The CUDA backend, the driver, NVRTC
/// and the CUDA runtime are reached this way, so that CPU runs never load them.
pub struct Library(*mut c_void);

impl Library {
    /// `dlopen(name, RTLD_NOW | RTLD_LOCAL)`: its symbols stay out of the global scope.
    pub fn open(name: &str) -> Result<Self, String> {
        Self::dlopen(name, libc::RTLD_NOW | libc::RTLD_LOCAL)
    }

    /// `dlopen(name, RTLD_NOW | RTLD_GLOBAL)`: its symbols serve the libraries loaded after it.
    pub fn open_global(name: &str) -> Result<Self, String> {
        Self::dlopen(name, libc::RTLD_NOW | libc::RTLD_GLOBAL)
    }

    /// The process's global scope (`RTLD_DEFAULT`): every library loaded globally so far.
    pub fn global_scope() -> Self {
        Self(libc::RTLD_DEFAULT)
    }

    fn dlopen(name: &str, flags: libc::c_int) -> Result<Self, String> {
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name; dlerror's string is copied before any other dl* call.
        unsafe {
            let handle = libc::dlopen(c_name.as_ptr(), flags);
            if handle.is_null() {
                let err = libc::dlerror();
                return Err(if err.is_null() {
                    format!("{name}: dlopen failed")
                } else {
                    CStr::from_ptr(err).to_string_lossy().into_owned()
                });
            }
            Ok(Self(handle))
        }
    }

    /// The function `name`, as a pointer of type `F`.
    ///
    /// # Safety
    /// `F` must be an `extern "C" fn` type matching the symbol's C declaration.
    pub unsafe fn get<F: Copy>(&self, name: &CStr) -> Result<F, String> {
        // SAFETY: a handle from dlopen (or RTLD_DEFAULT) and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        if p.is_null() {
            return Err(format!("{} not found", name.to_string_lossy()));
        }
        debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: `F` is a function pointer type of the symbol's C declaration (the caller's
        // promise), the same size as the symbol's address.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes: what the kernel can hand out without swapping.
pub fn available_memory() -> Option<u64> {
    meminfo_field("MemAvailable:")
}

fn meminfo_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Room for what is mapped but never touched: shared libraries (libtorch's alone are about a
/// gigabyte), thread stacks and the allocator's reserved arenas.
const ADDRESS_SPACE_SLACK: u64 = 8 << 30;

/// Caps the process's address space (RLIMIT_AS) at physical memory + swap + 8 GiB, unless a
/// lower cap is already set. The process-wide allocator (mimalloc) maps large blocks with
/// MAP_NORESERVE, which the kernel's overcommit heuristic never refuses: a forward that asks
/// for 4 TiB would get it, and the process would be killed when it touched the pages. Under
/// the cap the mapping fails, libtorch throws "not enough memory", and maskaudit reports it.
/// For CPU runs only: the CUDA driver reserves address space far beyond physical memory.
pub fn cap_address_space() {
    let (Some(ram), swap) = (meminfo_field("MemTotal:"), meminfo_field("SwapTotal:")) else {
        return;
    };
    let cap = ram + swap.unwrap_or(0) + ADDRESS_SPACE_SLACK;
    // SAFETY: plain system calls on a local struct.
    unsafe {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_AS, &mut current) != 0 {
            return;
        }
        let cap = cap.min(current.rlim_max);
        if current.rlim_cur != libc::RLIM_INFINITY && current.rlim_cur <= cap {
            return;
        }
        let limit = libc::rlimit {
            rlim_cur: cap,
            rlim_max: current.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_AS, &limit);
    }
}

/// Sends file descriptor 1 to standard error until dropped. TorchScript's `print` writes to
/// the process's standard output, where it would corrupt `--format json`; the report is
/// written after the guard is gone.
pub struct StdoutToStderr {
    saved: i32,
}

impl StdoutToStderr {
    pub fn new() -> io::Result<Self> {
        io::stdout().flush()?;
        // SAFETY: descriptor juggling on 1 and 2; `saved` is owned by the guard.
        unsafe {
            libc::fflush(std::ptr::null_mut());
            let saved = libc::dup(1);
            if saved < 0 || libc::dup2(2, 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { saved })
        }
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        let _ = io::stdout().flush();
        // SAFETY: restores the descriptor saved in `new`; C stdio buffers (which C++ streams
        // write through by default) are flushed first, so they land on standard error.
        unsafe {
            libc::fflush(std::ptr::null_mut());
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}

/// `1.5 GiB`, `300 MiB`.
pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let x = n as f64;
    if x >= GIB {
        format!("{:.1} GiB", x / GIB)
    } else {
        format!("{:.0} MiB", (x / MIB).ceil())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_and_sizes_print() {
        assert!(available_memory().is_some_and(|m| m > 0));
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(300 << 20), "300 MiB");
    }
}
