//! The fused cross-entropy's machine code, kept on disk between runs so that a run finds it
//! instead of compiling it.
//!
//! NVRTC's compile of [`super::cuda_ce::KERNEL_SOURCE`] costs CPU time and resident memory that
//! stay with the process (its library and the compiler's heap), about as much as the PyTorch
//! script it is measured against spends above maskaudit (docs/performance.md, "Figures behind
//! the code"). Like
//! CUDA's own `~/.nv/ComputeCache`, the CUBIN goes in the user's cache folder:
//! `$MASKAUDIT_CACHE`, else `$XDG_CACHE_HOME/maskaudit`, else `~/.cache/maskaudit`, in
//! `kernels/`. `MASKAUDIT_CACHE=off` keeps nothing. A file is named by a hash of the kernel's
//! source and compiler options (so a changed kernel or another GPU architecture is another
//! file), written whole and renamed into place (so concurrent runs never read half of one), and
//! carries a checksum of its content; one that does not verify, or that the driver refuses to
//! load (made by a newer NVRTC than the driver knows, say), is compiled again and replaced.
//! Every failure to read or write the cache only means compiling, as without one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The first bytes of a cache file, then the content's FNV-1a hash (8 bytes, little-endian).
const MAGIC: &[u8] = b"maskaudit kernel cache 1\n";

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache folder from the environment's values (`MASKAUDIT_CACHE`, `XDG_CACHE_HOME`,
/// `HOME`); `None` when it is off or no folder is named.
pub fn folder_from(
    maskaudit_cache: Option<&str>,
    xdg_cache_home: Option<&str>,
    home: Option<&str>,
) -> Option<PathBuf> {
    fn nonempty(v: Option<&str>) -> Option<&str> {
        v.filter(|s| !s.is_empty())
    }
    match nonempty(maskaudit_cache) {
        Some("off" | "0") => None,
        Some(dir) => Some(PathBuf::from(dir).join("kernels")),
        None => nonempty(xdg_cache_home)
            .map(|d| PathBuf::from(d).join("maskaudit"))
            .or_else(|| nonempty(home).map(|h| PathBuf::from(h).join(".cache/maskaudit")))
            .map(|d| d.join("kernels")),
    }
}

/// This process's cache folder, as [`super::cuda_ce::configure`] set it; none until then.
pub fn folder() -> Option<PathBuf> {
    FOLDER.get().cloned().flatten()
}

/// Sets [`folder`], once: later calls change nothing.
pub fn set_folder(folder: Option<PathBuf>) {
    let _ = FOLDER.set(folder);
}

static FOLDER: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The file names of one kernel source: a prefix shared by every architecture, then the
/// options' own part.
pub struct Key {
    source: u64,
    options: u64,
}

impl Key {
    pub fn new(source: &str, options: &[&str]) -> Self {
        let opts: Vec<&[u8]> = options.iter().map(|o| o.as_bytes()).collect();
        Self {
            source: fnv1a(&[source.as_bytes()]),
            options: fnv1a(&opts),
        }
    }

    fn prefix(source: &str) -> String {
        format!("cuda-ce-{:016x}-", fnv1a(&[source.as_bytes()]))
    }

    fn file_name(&self) -> String {
        format!("cuda-ce-{:016x}-{:016x}.cubin", self.source, self.options)
    }
}

/// Whether `folder` holds a file of this kernel source for any architecture: then a run on this
/// machine is likely to find its own and need no compiler.
pub fn has_any(folder: &Path, source: &str) -> bool {
    let prefix = Key::prefix(source);
    std::fs::read_dir(folder).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".cubin")
        })
    })
}

/// The image stored under `key`, if there is one and its checksum holds.
pub fn read(folder: &Path, key: &Key) -> Option<Vec<u8>> {
    let bytes = std::fs::read(folder.join(key.file_name())).ok()?;
    let rest = bytes.strip_prefix(MAGIC)?;
    if rest.len() < 8 {
        return None;
    }
    let (sum, image) = rest.split_at(8);
    let sum = u64::from_le_bytes(sum.try_into().ok()?);
    (!image.is_empty() && fnv1a(&[image]) == sum).then(|| image.to_vec())
}

/// Stores `image` under `key`: written to a file of this process's own, then renamed over the
/// name. Errors are the caller's to ignore.
pub fn write(folder: &Path, key: &Key, image: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(folder)?;
    let name = key.file_name();
    let partial = folder.join(format!("{name}.{}.partial", std::process::id()));
    let mut content = Vec::with_capacity(MAGIC.len() + 8 + image.len());
    content.extend_from_slice(MAGIC);
    content.extend_from_slice(&fnv1a(&[image]).to_le_bytes());
    content.extend_from_slice(image);
    let written = std::fs::write(&partial, &content)
        .and_then(|()| std::fs::rename(&partial, folder.join(&name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_follows_the_environment() {
        let f = |m, x, h| folder_from(m, x, h);
        assert_eq!(
            f(Some("/c"), Some("/x"), Some("/h")),
            Some(PathBuf::from("/c/kernels"))
        );
        assert_eq!(f(Some("off"), Some("/x"), Some("/h")), None);
        assert_eq!(f(Some("0"), None, Some("/h")), None);
        assert_eq!(
            f(None, Some("/x"), Some("/h")),
            Some(PathBuf::from("/x/maskaudit/kernels"))
        );
        assert_eq!(
            f(Some(""), Some(""), Some("/h")),
            Some(PathBuf::from("/h/.cache/maskaudit/kernels"))
        );
        assert_eq!(f(None, None, None), None);
    }

    #[test]
    fn keys_differ_by_source_and_options() {
        let a = Key::new("src", &["-arch=sm_90", "--std=c++14"]);
        let b = Key::new("src", &["-arch=sm_80", "--std=c++14"]);
        let c = Key::new("src2", &["-arch=sm_90", "--std=c++14"]);
        let d = Key::new("src", &["-arch=sm_9", "0--std=c++14"]);
        let names = [a.file_name(), b.file_name(), c.file_name(), d.file_name()];
        for (i, x) in names.iter().enumerate() {
            for y in &names[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert!(a.file_name().starts_with(&Key::prefix("src")));
        assert!(!c.file_name().starts_with(&Key::prefix("src")));
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "maskaudit-kernel-cache-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn an_image_comes_back_as_written() {
        let dir = scratch("round-trip");
        let key = Key::new("src", &["-arch=sm_90"]);
        assert!(!has_any(&dir, "src"));
        assert_eq!(read(&dir, &key), None);
        write(&dir, &key, b"\x7fELF machine code").unwrap();
        assert_eq!(
            read(&dir, &key).as_deref(),
            Some(&b"\x7fELF machine code"[..])
        );
        assert!(has_any(&dir, "src"));
        assert!(!has_any(&dir, "other source"));
        // Another architecture's file is another file.
        assert_eq!(read(&dir, &Key::new("src", &["-arch=sm_80"])), None);
        // Nothing partial is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_not_read() {
        let dir = scratch("damaged");
        let key = Key::new("src", &["-arch=sm_90"]);
        write(&dir, &key, b"machine code").unwrap();
        let path = dir.join(key.file_name());
        let whole = std::fs::read(&path).unwrap();
        // A flipped byte, a cut, another program's file, nothing.
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        for bad in [
            flipped,
            whole[..whole.len() - 3].to_vec(),
            whole[..MAGIC.len() + 8].to_vec(),
            b"\x7fELF".to_vec(),
            vec![],
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(read(&dir, &key), None, "{bad:?}");
        }
        // Written again, it reads again.
        write(&dir, &key, b"machine code").unwrap();
        assert_eq!(read(&dir, &key).as_deref(), Some(&b"machine code"[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_folder_is_an_error_not_a_panic() {
        let dir = scratch("unwritable");
        std::fs::write(&dir, b"a file where the folder would be").unwrap();
        assert!(write(&dir, &Key::new("src", &[]), b"x").is_err());
        assert!(!has_any(&dir, "src"));
        std::fs::remove_file(&dir).unwrap();
    }
}
