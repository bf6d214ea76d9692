//! The files a run writes, and the promise that none of them is one of its inputs.
//!
//! Every input and every output is identified by its (device, inode) after following links,
//! so that a symlink, a hard link or `/dev/stdin` naming an input is caught as surely as its
//! own path. The outputs are then staged: each gets a temporary file in its destination's
//! directory before the run starts (a missing or read-only directory fails at once), is
//! written there, and is renamed onto its destination only by [`Outputs::commit`], once the
//! whole run has succeeded. A run that fails drops its [`Outputs`], which removes the
//! temporary files: no new, partial or replaced report. A destination that exists and is not
//! a regular file (`/dev/null`, `/dev/stdout`, a named pipe) is written directly.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// A file a run may write. A new output is a variant here and a line where the run lists
/// its outputs ([`crate::cli::run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    WeightsOut,
    Junit,
    Html,
    WriteBaseline,
    /// GitHub Actions' job summary: appended to, as GitHub's protocol asks.
    StepSummary,
}

impl Output {
    /// How the user named it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Output::WeightsOut => "--weights-out",
            Output::Junit => "--junit",
            Output::Html => "--html",
            Output::WriteBaseline => "--write-baseline",
            Output::StepSummary => "GITHUB_STEP_SUMMARY",
        }
    }

    fn appends(self) -> bool {
        self == Output::StepSummary
    }
}

/// What names `--baseline` among the inputs: `--write-baseline` may update it.
pub const BASELINE: &str = "--baseline file";

/// A file's identity once links are followed: two paths to one file share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// An input of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// What it is, as messages name it: `DATA`, `MODEL`, `--loss file`, …
    pub what: &'static str,
    pub shown: String,
    pub id: FileId,
}

impl Input {
    /// The file at `path`; `None` when there is none (the run reports that itself).
    pub fn file(what: &'static str, path: &Path) -> Option<Input> {
        let meta = fs::metadata(path).ok()?;
        Some(Input {
            what,
            shown: path.display().to_string(),
            id: FileId::of(&meta),
        })
    }

    /// What standard input is (`fstat(0)`), for DATA `-`.
    pub fn stdin(what: &'static str) -> Option<Input> {
        let fd = io::stdin().as_fd().try_clone_to_owned().ok()?;
        let meta = File::from(fd).metadata().ok()?;
        Some(Input {
            what,
            shown: "standard input".into(),
            id: FileId::of(&meta),
        })
    }
}

/// Where an output's path leads, links followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spot {
    /// An existing regular file, by identity, and its path with every link resolved.
    File { id: FileId, path: PathBuf },
    /// Something else that exists (a character device, a pipe): written directly.
    Special { id: FileId, char_device: bool },
    /// No file yet: its directory (resolved) and name.
    New { dir: PathBuf, name: OsString },
}

impl Spot {
    /// Where `path` leads. A dangling link is a new file in the link's place.
    pub fn of(path: &Path) -> io::Result<Spot> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(Spot::File {
                id: FileId::of(&meta),
                path: fs::canonicalize(path)?,
            }),
            Ok(meta) if meta.is_dir() => Err(io::Error::other("is a directory")),
            Ok(meta) => Ok(Spot::Special {
                id: FileId::of(&meta),
                char_device: meta.file_type().is_char_device(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let name = path
                    .file_name()
                    .ok_or_else(|| io::Error::other("not a file name"))?;
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let dir = fs::canonicalize(dir).map_err(|e| {
                    io::Error::new(e.kind(), format!("its directory cannot be used: {e}"))
                })?;
                Ok(Spot::New {
                    dir,
                    name: name.to_owned(),
                })
            }
            Err(e) => Err(e),
        }
    }

    fn id(&self) -> Option<FileId> {
        match self {
            Spot::File { id, .. } | Spot::Special { id, .. } => Some(*id),
            Spot::New { .. } => None,
        }
    }

    /// Writing a character device (`/dev/null`, a terminal) destroys nothing stored in it.
    fn harmless(&self) -> bool {
        matches!(
            self,
            Spot::Special {
                char_device: true,
                ..
            }
        )
    }

    fn same(&self, other: &Spot) -> bool {
        match (self, other) {
            (Spot::New { dir, name }, Spot::New { dir: d, name: n }) => dir == d && name == n,
            _ => self.id().is_some() && self.id() == other.id(),
        }
    }
}

/// An output as asked: which, the path as given, and where it leads.
#[derive(Debug, Clone)]
pub struct Planned {
    pub output: Output,
    pub path: PathBuf,
    pub spot: Spot,
}

/// The refusals, pure: an output that is an input (but `--write-baseline` may be
/// `--baseline`), or two outputs on one file.
pub fn check(outputs: &[Planned], inputs: &[Input]) -> Result<(), String> {
    for (i, out) in outputs.iter().enumerate() {
        if out.spot.harmless() {
            continue;
        }
        let id = out.spot.id();
        let clash = inputs.iter().find(|input| {
            Some(input.id) == id && !(out.output == Output::WriteBaseline && input.what == BASELINE)
        });
        if let Some(input) = clash {
            return Err(format!(
                "{} {}: is the {} of this run ({}); refusing to overwrite an input, choose another file",
                out.output.name(),
                out.path.display(),
                input.what,
                input.shown
            ));
        }
        if let Some(other) = outputs[..i].iter().find(|o| o.spot.same(&out.spot)) {
            return Err(format!(
                "{} {} and {} {} are one file: give each output a file of its own",
                other.output.name(),
                other.path.display(),
                out.output.name(),
                out.path.display()
            ));
        }
    }
    Ok(())
}

/// What standard output is when it is a regular file (`maskaudit … >> FILE`), `fstat(1)`.
fn stdout_id() -> Option<FileId> {
    let fd = io::stdout().as_fd().try_clone_to_owned().ok()?;
    let meta = File::from(fd).metadata().ok()?;
    meta.is_file().then(|| FileId::of(&meta))
}

/// The report on standard output is an output too: appended to an input (`>> data.jsonl`),
/// it would grow the file being read. (`> data.jsonl` has emptied it before the run starts:
/// that the shell does, and the run then finds no data.)
fn check_stdout(stdout: Option<FileId>, inputs: &[Input]) -> Result<(), String> {
    match inputs.iter().find(|input| Some(input.id) == stdout) {
        Some(input) => Err(format!(
            "standard output is the {} of this run ({}); refusing to write the report onto an input, redirect it to another file",
            input.what, input.shown
        )),
        None => Ok(()),
    }
}

/// Where an output's bytes go until the run ends.
struct Staged {
    output: Output,
    shown: String,
    file: File,
    /// The temporary file and its destination; `None` for a file written directly (an
    /// existing one that is not regular), and once renamed.
    temp: Option<(PathBuf, PathBuf)>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some((temp, _)) = &self.temp {
            let _ = fs::remove_file(temp);
        }
    }
}

impl Staged {
    fn context(&self) -> String {
        format!("{} {}: cannot write there", self.output.name(), self.shown)
    }
}

/// The run's outputs, staged: written into temporary files, committed at the end.
pub struct Outputs {
    staged: Vec<Staged>,
}

impl Outputs {
    /// Checks the outputs against the inputs and each other, then creates every temporary
    /// file. Errors are one line naming the option and its path.
    pub fn stage(asked: &[(Output, &Path)], inputs: &[Input]) -> Result<Outputs> {
        let mut planned = Vec::with_capacity(asked.len());
        for &(output, path) in asked {
            let spot = Spot::of(path).map_err(|e| {
                anyhow!(
                    "{} {}: cannot write there: {e}",
                    output.name(),
                    path.display()
                )
            })?;
            planned.push(Planned {
                output,
                path: path.to_path_buf(),
                spot,
            });
        }
        check(&planned, inputs).map_err(|e| anyhow!(e))?;
        check_stdout(stdout_id(), inputs).map_err(|e| anyhow!(e))?;
        let mut staged = Vec::with_capacity(planned.len());
        for plan in planned {
            let shown = plan.path.display().to_string();
            let context = || format!("{} {shown}: cannot write there", plan.output.name());
            let (file, temp) = match plan.spot {
                Spot::File { path, .. } => {
                    let mode = fs::metadata(&path).map(|m| m.mode()).ok();
                    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
                    let name = path.file_name().unwrap_or_default().to_owned();
                    let (file, temp) = temp_file(&dir, &name, mode).with_context(context)?;
                    (file, Some((temp, path)))
                }
                Spot::New { dir, name } => {
                    let (file, temp) = temp_file(&dir, &name, None).with_context(context)?;
                    (file, Some((temp, dir.join(&name))))
                }
                Spot::Special { .. } => {
                    let file = OpenOptions::new()
                        .write(true)
                        .append(plan.output.appends())
                        .open(&plan.path)
                        .with_context(context)?;
                    (file, None)
                }
            };
            staged.push(Staged {
                output: plan.output,
                shown,
                file,
                temp,
            });
        }
        Ok(Outputs { staged })
    }

    /// A handle on an output's staged file, for writing it while the run goes on.
    pub fn handle(&self, output: Output) -> Result<Option<File>> {
        let Some(staged) = self.staged.iter().find(|s| s.output == output) else {
            return Ok(None);
        };
        let file = staged.file.try_clone().with_context(|| staged.context())?;
        Ok(Some(file))
    }

    /// Writes an output's contents (for the job summary, after what the file held), if it
    /// was asked for.
    pub fn write(
        &mut self,
        output: Output,
        write: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
    ) -> Result<()> {
        let Some(staged) = self.staged.iter().find(|s| s.output == output) else {
            return Ok(());
        };
        if let (true, Some((_, dest))) = (output.appends(), &staged.temp) {
            match File::open(dest) {
                Ok(mut old) => {
                    io::copy(&mut old, &mut &staged.file).with_context(|| staged.context())?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| staged.context()),
            }
        }
        let mut out = io::BufWriter::new(&staged.file);
        write(&mut out)
            .and_then(|()| out.flush())
            .with_context(|| staged.context())
    }

    /// Renames every temporary file onto its destination: the run succeeded.
    pub fn commit(self) -> Result<()> {
        for mut staged in self.staged {
            if let Some((temp, dest)) = &staged.temp {
                fs::rename(temp, dest).with_context(|| staged.context())?;
                staged.temp = None;
            }
        }
        Ok(())
    }
}

/// A new temporary file in `dir`, named after the destination `name`, with the destination's
/// mode (else the one a new file gets under the umask).
fn temp_file(dir: &Path, name: &OsString, mode: Option<u32>) -> io::Result<(File, PathBuf)> {
    let mut attempt = 0u32;
    loop {
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".maskaudit-{}-{attempt}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&temp)
        {
            Ok(file) => {
                if let Some(mode) = mode {
                    fs::set_permissions(&temp, fs::Permissions::from_mode(mode & 0o7777))?;
                }
                return Ok((file, temp));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_output_onto_an_input_is_refused() {
        let data = Input {
            what: "DATA",
            shown: "d.jsonl".into(),
            id: FileId { dev: 1, ino: 7 },
        };
        let err =
            check_stdout(Some(FileId { dev: 1, ino: 7 }), std::slice::from_ref(&data)).unwrap_err();
        assert!(
            err.starts_with("standard output is the DATA of this run (d.jsonl)"),
            "{err}"
        );
        assert_eq!(
            check_stdout(Some(FileId { dev: 1, ino: 8 }), std::slice::from_ref(&data)),
            Ok(())
        );
        assert_eq!(check_stdout(None, &[data]), Ok(()));
    }

    fn id(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    fn file(output: Output, ino: u64) -> Planned {
        Planned {
            output,
            path: PathBuf::from(format!("f{ino}")),
            spot: Spot::File {
                id: id(ino),
                path: PathBuf::from(format!("/d/f{ino}")),
            },
        }
    }

    fn new(output: Output, dir: &str, name: &str) -> Planned {
        Planned {
            output,
            path: PathBuf::from(name),
            spot: Spot::New {
                dir: PathBuf::from(dir),
                name: name.into(),
            },
        }
    }

    fn input(what: &'static str, ino: u64) -> Input {
        Input {
            what,
            shown: format!("in{ino}"),
            id: id(ino),
        }
    }

    #[test]
    fn an_output_that_is_an_input_is_refused_naming_both() {
        let inputs = [input("DATA", 1), input("MODEL", 2), input(BASELINE, 3)];
        assert_eq!(check(&[file(Output::Junit, 9)], &inputs), Ok(()));
        assert_eq!(
            check(&[file(Output::WeightsOut, 2)], &inputs).unwrap_err(),
            "--weights-out f2: is the MODEL of this run (in2); refusing to overwrite an input, choose another file"
        );
        let summary = check(&[file(Output::StepSummary, 1)], &inputs).unwrap_err();
        assert!(
            summary.starts_with("GITHUB_STEP_SUMMARY f1: is the DATA"),
            "{summary}"
        );
        // --write-baseline may update --baseline, and nothing else may.
        assert_eq!(check(&[file(Output::WriteBaseline, 3)], &inputs), Ok(()));
        assert!(check(&[file(Output::Html, 3)], &inputs).is_err());
        assert!(check(&[file(Output::WriteBaseline, 1)], &inputs).is_err());
        // The same inode on another device is another file.
        let other_device = Input {
            id: FileId { dev: 2, ino: 9 },
            ..input("DATA", 9)
        };
        assert_eq!(check(&[file(Output::Junit, 9)], &[other_device]), Ok(()));
    }

    #[test]
    fn two_outputs_on_one_file_are_refused() {
        let err = check(&[file(Output::Junit, 4), file(Output::Html, 4)], &[]).unwrap_err();
        assert_eq!(
            err,
            "--junit f4 and --html f4 are one file: give each output a file of its own"
        );
        let twice_new = [new(Output::Junit, "/d", "r"), new(Output::Html, "/d", "r")];
        assert!(check(&twice_new, &[]).is_err());
        let apart = [new(Output::Junit, "/d", "r"), new(Output::Html, "/e", "r")];
        assert_eq!(check(&apart, &[]), Ok(()));
    }

    #[test]
    fn character_devices_are_shared_freely() {
        let null = |output| Planned {
            output,
            path: PathBuf::from("/dev/null"),
            spot: Spot::Special {
                id: id(5),
                char_device: true,
            },
        };
        let inputs = [input("DATA", 5)];
        assert_eq!(
            check(&[null(Output::Junit), null(Output::Html)], &inputs),
            Ok(())
        );
        // A pipe is not: what is written to it is read by someone.
        let pipe = Planned {
            spot: Spot::Special {
                id: id(5),
                char_device: false,
            },
            ..null(Output::Junit)
        };
        assert!(check(&[pipe], &inputs).is_err());
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("maskaudit-outputs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn nothing_is_written_until_commit_and_a_dropped_run_leaves_nothing() {
        let dir = scratch("commit");
        let old = dir.join("old.html");
        fs::write(&old, "old").unwrap();
        let new = dir.join("new.xml");
        let asked = [
            (Output::Html, old.as_path()),
            (Output::Junit, new.as_path()),
        ];
        let mut outputs = Outputs::stage(&asked, &[]).unwrap();
        outputs
            .write(Output::Html, |w| w.write_all(b"fresh"))
            .unwrap();
        outputs
            .write(Output::Junit, |w| w.write_all(b"<x/>"))
            .unwrap();
        assert_eq!(fs::read_to_string(&old).unwrap(), "old");
        assert!(!new.exists());
        drop(outputs);
        assert_eq!(entries(&dir), ["old.html"]);

        let mut outputs = Outputs::stage(&asked, &[]).unwrap();
        outputs
            .write(Output::Html, |w| w.write_all(b"fresh"))
            .unwrap();
        outputs.commit().unwrap();
        assert_eq!(fs::read_to_string(&old).unwrap(), "fresh");
        // Asked but never written: an empty file, as before.
        assert_eq!(fs::read_to_string(&new).unwrap(), "");
        assert_eq!(entries(&dir), ["new.xml", "old.html"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_link_is_kept_and_its_target_replaced_and_the_summary_appended() {
        let dir = scratch("link");
        let target = dir.join("target.md");
        fs::write(&target, "earlier\n").unwrap();
        let link = dir.join("link.md");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut outputs = Outputs::stage(&[(Output::StepSummary, link.as_path())], &[]).unwrap();
        outputs
            .write(Output::StepSummary, |w| w.write_all(b"later\n"))
            .unwrap();
        outputs.commit().unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&target).unwrap(), "earlier\nlater\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_fails_when_staged() {
        let dir = scratch("missing");
        let path = dir.join("no/such/dir/r.xml");
        let err = Outputs::stage(&[(Output::Junit, path.as_path())], &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("--junit ") && err.contains("cannot write there"),
            "{err}"
        );
        let dev_null = Path::new("/dev/null");
        let mut outputs = Outputs::stage(&[(Output::Html, dev_null)], &[]).unwrap();
        outputs.write(Output::Html, |w| w.write_all(b"x")).unwrap();
        outputs.commit().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
