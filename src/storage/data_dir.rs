//! The data dir: made private to its owner, and marked as DKVS's.
//!
//! A node writes into `--data-dir` and, with the fjall engine, into the dir
//! itself: given a dir that holds something else (a home directory, another
//! program's data, a mistyped path), it would scatter its files among
//! others and could mistake theirs for its own. So the dir carries a marker
//! file, [`MARKER`], written when DKVS first uses the dir, naming its
//! format version (DESIGN, Upgrades). A node starts on:
//!
//! - a missing dir, made with mode 0700, or an empty one (a `lost+found`
//!   of a dedicated disk counts as empty): the marker is written;
//! - a dir with the marker of a format this release reads;
//! - a dir without the marker that holds only what DKVS writes (a data dir
//!   of a release before the marker): adopted once, its files made 0600
//!   and its dirs 0700, and the marker written.
//!
//! Anything else is refused, naming what does not belong. Files DKVS
//! writes later are 0600 because `DKVSServer` sets its umask to 077 before
//! it opens anything ([`restrict_new_files`]): the engines (fjall among
//! them) create their files themselves, with the process's umask.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// The marker file's name, in the data dir.
pub const MARKER: &str = "DKVS-DATA-DIR";
/// The data dir format this release writes and reads.
pub const FORMAT: u32 = 1;
/// The marker's first line; the second is `format <FORMAT>`.
const MARKER_TITLE: &str = "DKVS data directory: do not add other files";

/// A dedicated disk's recovery dir, left where it is.
const LOST_AND_FOUND: &str = "lost+found";

/// Whether a name in the data dir is one DKVS writes there: the log
/// engine's dir, the layout file (and its temporary), fjall's dirs and
/// files, and the marker (and its temporary: a node stopped while it wrote
/// the marker must still find its data its own).
fn written_by_dkvs(name: &str) -> bool {
    matches!(
        name,
        "log" | "layout" | "layout.tmp" | "keyspaces" | "lock" | "version" | MARKER
    ) || name == format!("{MARKER}.tmp")
        || name
            .strip_suffix(".jnl")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// What a dir without the marker holds, by name.
#[derive(Debug, PartialEq, Eq)]
pub enum Contents {
    /// Nothing (or only `lost+found`).
    Empty,
    /// Only what DKVS writes: a data dir from before the marker.
    Dkvs,
    /// These names, which DKVS does not write.
    Foreign(Vec<String>),
}

/// Sorts a dir's entry names into [`Contents`].
pub fn classify<'a>(names: impl IntoIterator<Item = &'a str>) -> Contents {
    let names: Vec<&str> = names.into_iter().filter(|n| *n != LOST_AND_FOUND).collect();
    let mut foreign: Vec<String> = names
        .iter()
        .filter(|n| !written_by_dkvs(n))
        .map(|n| n.to_string())
        .collect();
    foreign.sort();
    match (names.is_empty(), foreign.is_empty()) {
        (true, _) => Contents::Empty,
        (false, true) => Contents::Dkvs,
        (false, false) => Contents::Foreign(foreign),
    }
}

/// The format a marker's text names: `None` when it is not a marker.
pub fn marker_format(text: &str) -> Option<u32> {
    let mut lines = text.lines();
    if lines.next()? != MARKER_TITLE {
        return None;
    }
    lines.next()?.strip_prefix("format ")?.trim().parse().ok()
}

/// Makes `dir` ready for a node: creates it (0700) or checks what it holds
/// (module docs). Errors name the dir and say what to do.
pub fn prepare(dir: &Path) -> Result<()> {
    let shown = dir.display();
    let io =
        |doing: &str, e: std::io::Error| Error::Storage(format!("cannot {doing} {shown}: {e}"));
    if !dir.exists() {
        create_private(dir).map_err(|e| io("create data dir", e))?;
    } else if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--data-dir {shown} is not a directory"
        )));
    }
    let marker = dir.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(text) => return check_marker(&marker, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read the marker in", e)),
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("list data dir", e))? {
        let entry = entry.map_err(|e| io("list data dir", e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    match classify(names.iter().map(String::as_str)) {
        Contents::Empty => {}
        Contents::Dkvs => {
            make_private(dir).map_err(|e| io("restrict the permissions in", e))?;
            tracing::info!(
                data_dir = %shown,
                "a data dir of an earlier release: adopted (files made 0600, dirs 0700, {MARKER} written)"
            );
        }
        Contents::Foreign(foreign) => {
            let mut listed = foreign
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if foreign.len() > 5 {
                listed.push_str(&format!(" and {} more", foreign.len() - 5));
            }
            return Err(Error::InvalidArgument(format!(
                "--data-dir {shown} holds files DKVS did not write ({listed}) and no {MARKER} \
                 marker: give each node an empty or new directory of its own (a dedicated \
                 disk's lost+found may stay), or the data dir of a DKVS node"
            )));
        }
    }
    write_marker(&marker).map_err(|e| io("write the marker in", e))?;
    warn_if_open_to_others(dir);
    Ok(())
}

/// A marker this release reads, or an error naming the file.
fn check_marker(marker: &Path, text: &str) -> Result<()> {
    match marker_format(text) {
        Some(FORMAT) => {
            warn_if_open_to_others(marker.parent().unwrap_or(marker));
            Ok(())
        }
        Some(format) => Err(Error::Storage(format!(
            "{} names data dir format {format}, and this release reads format {FORMAT}: a newer \
             DKVS release wrote it (downgrades are not supported; run that release)",
            marker.display()
        ))),
        None => Err(Error::Storage(format!(
            "{} is not a DKVS marker (damaged?): it should read \"{MARKER_TITLE}\" and \
             \"format {FORMAT}\"",
            marker.display()
        ))),
    }
}

/// Creates `dir` with mode 0700 (its missing parents as usual).
fn create_private(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// Writes the marker (0600), synced, through a temporary file renamed into
/// place, so a crash leaves either no marker or a whole one.
fn write_marker(marker: &Path) -> std::io::Result<()> {
    let temporary = marker.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary)?;
    file.write_all(format!("{MARKER_TITLE}\nformat {FORMAT}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, marker)?;
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Modes of an adopted dir: 0700 for it and its dirs, 0600 for its files
/// (`lost+found` left alone).
fn make_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name() == LOST_AND_FOUND {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                make_private(&entry.path())?;
            } else if kind.is_file() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Warns when users other than the owner may enter the data dir (a dir the
/// operator made, not DKVS).
fn warn_if_open_to_others(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                data_dir = %dir.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the data dir is open to other users of this machine: chmod 700 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Sets the process's umask to 077: every file and dir it creates from
/// then on (the engines', the layout's) is its owner's only. For
/// `DKVSServer`'s `main`, before anything is opened; it changes the whole
/// process, so the library never calls it.
pub fn restrict_new_files() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's file-mode mask; it cannot fail
    // and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sorted_into_empty_dkvs_and_foreign() {
        assert_eq!(classify([]), Contents::Empty);
        assert_eq!(classify(["lost+found"]), Contents::Empty);
        assert_eq!(classify(["log", "layout"]), Contents::Dkvs);
        // Stopped while writing the marker of an adopted dir.
        assert_eq!(
            classify(["log", "layout", "DKVS-DATA-DIR.tmp"]),
            Contents::Dkvs
        );
        assert_eq!(
            classify([
                "keyspaces",
                "lock",
                "version",
                "0.jnl",
                "12.jnl",
                "lost+found"
            ]),
            Contents::Dkvs
        );
        assert_eq!(
            classify(["layout", "notes.txt", ".bashrc", "x.jnl"]),
            Contents::Foreign(vec![".bashrc".into(), "notes.txt".into(), "x.jnl".into()])
        );
    }

    #[test]
    fn a_marker_names_its_format() {
        assert_eq!(
            marker_format(&format!("{MARKER_TITLE}\nformat 1\n")),
            Some(1)
        );
        assert_eq!(
            marker_format(&format!("{MARKER_TITLE}\nformat 7\n")),
            Some(7)
        );
        assert_eq!(marker_format("something else\nformat 1\n"), None);
        assert_eq!(marker_format(&format!("{MARKER_TITLE}\n")), None);
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_new_dir_is_private_and_marked() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a").join("node");
        prepare(&dir).expect("prepare");
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(MARKER)), 0o600);
        }
        assert_eq!(
            marker_format(&std::fs::read_to_string(dir.join(MARKER)).expect("marker")),
            Some(FORMAT)
        );
        // Again: the marker is found.
        prepare(&dir).expect("again");
    }

    #[test]
    fn a_dir_of_other_files_is_refused_and_left_as_it_was() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("photo.jpg"), b"x").expect("write");
        std::fs::create_dir(root.path().join("lost+found")).expect("mkdir");
        let error = prepare(root.path()).expect_err("foreign").to_string();
        assert!(
            error.contains("photo.jpg") && error.contains("--data-dir"),
            "{error}"
        );
        assert!(!root.path().join(MARKER).exists());
    }

    #[test]
    fn an_old_dkvs_dir_is_adopted_once() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("log")).expect("mkdir");
        std::fs::write(root.path().join("log").join("0001.log"), b"x").expect("write");
        std::fs::write(root.path().join("layout"), b"x").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let open = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(root.path().join("layout"), open).expect("chmod");
        }
        prepare(root.path()).expect("adopted");
        assert!(root.path().join(MARKER).exists());
        #[cfg(unix)]
        {
            assert_eq!(mode(&root.path().join("layout")), 0o600);
            assert_eq!(mode(&root.path().join("log")), 0o700);
            assert_eq!(mode(&root.path().join("log").join("0001.log")), 0o600);
        }
        // Marked now: another file no longer makes it foreign.
        std::fs::write(root.path().join("README"), b"x").expect("write");
        prepare(root.path()).expect("marked");
    }

    #[test]
    fn a_marker_of_a_newer_format_is_refused_naming_it() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            root.path().join(MARKER),
            format!("{MARKER_TITLE}\nformat 2\n"),
        )
        .expect("write");
        let error = prepare(root.path()).expect_err("newer").to_string();
        assert!(
            error.contains("format 2") && error.contains(MARKER),
            "{error}"
        );
    }
}
