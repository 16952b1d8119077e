//! Listing the input files in reading order, and recognising IoT Central's blob export layout
//! (partition and minute from the path).

use std::sync::Arc;

use anyhow::{bail, Context};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::{FilesConfig, Layout};
use crate::event::Nanos;
use crate::storage::Location;

/// One input file.
#[derive(Debug, Clone)]
pub(super) struct FileEntry {
    pub(super) path: Path,
    pub(super) size: u64,
    pub(super) partition: u32,
    /// Minute of the blob export folder, if the layout has one.
    pub(super) minute: Option<Nanos>,
    pub(super) display: Arc<str>,
}

/// Lists the files of a location in reading order.
pub(super) async fn list_files(
    loc: &Location,
    cfg: &FilesConfig,
    from: Nanos,
    to: Nanos,
) -> anyhow::Result<Vec<FileEntry>> {
    // a single local file
    if let Some(p) = &loc.local_path {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_file() {
            return Ok(vec![FileEntry {
                path: loc.prefix.clone(),
                size: meta.len(),
                partition: 0,
                minute: None,
                display: p.display().to_string().into(),
            }]);
        }
    } else if let Ok(meta) = loc.store.head(&loc.prefix).await {
        // a single object
        return Ok(vec![FileEntry {
            path: meta.location.clone(),
            size: meta.size,
            partition: 0,
            minute: None,
            display: loc.display.clone().into(),
        }]);
    }
    let metas: Vec<object_store::ObjectMeta> =
        loc.store.list(Some(&loc.prefix)).try_collect().await.with_context(|| format!("listing {}", loc.display))?;
    let mut files: Vec<FileEntry> = Vec::new();
    for m in metas {
        let rel = loc.relative(&m.location);
        if !wanted(&rel, &cfg.extensions) {
            continue;
        }
        // the whole path: the URL may be the application's folder or a partition's, below which
        // the path has no app-id or partition
        let (partition, minute) =
            parse_blob_layout(m.location.as_ref()).map(|(p, m)| (p, Some(m))).unwrap_or((0, None));
        files.push(FileEntry {
            display: loc.describe(&m.location).into(),
            path: m.location,
            size: m.size,
            partition,
            minute,
        });
    }
    let all_blob = !files.is_empty() && files.iter().all(|f| f.minute.is_some());
    let use_blob = match cfg.layout {
        Layout::Iotcentral => {
            if let Some(bad) = files.iter().find(|f| f.minute.is_none()) {
                bail!(
                    "{} does not follow IoT Central's layout {{app-id}}/{{partition}}/{{YYYY}}/{{MM}}/{{dd}}/{{hh}}/{{mm}}/{{file}}",
                    bad.display
                );
            }
            true
        }
        Layout::Plain => false,
        Layout::Auto => all_blob,
    };
    if use_blob {
        // A minute folder holds what was exported during that minute; IoT Central may export up
        // to 60 s late, so keep two minutes of slack on each side. Events are filtered exactly.
        let slack = 120 * 1_000_000_000;
        files.retain(|f| {
            let m = f.minute.unwrap();
            m + 60_000_000_000 + slack > from && m - slack < to
        });
        files.sort_by(|a, b| (a.minute, a.partition, a.path.as_ref()).cmp(&(b.minute, b.partition, b.path.as_ref())));
    } else {
        for f in &mut files {
            f.partition = 0;
        }
        files.sort_by(|a, b| a.path.as_ref().cmp(b.path.as_ref()));
    }
    Ok(files)
}

/// Whether a file (its path relative to the URL) is input: not hidden (no segment starts with
/// `.` or `_`, so files being written under such a name and staging folders are left out), and
/// with one of `extensions` when there are any.
pub(super) fn wanted(rel: &str, extensions: &[String]) -> bool {
    let name = rel.rsplit('/').next().unwrap_or("");
    let hidden = rel.split('/').any(|seg| seg.starts_with('.') || seg.starts_with('_'));
    !hidden && (extensions.is_empty() || extensions.iter().any(|e| name.ends_with(e.as_str())))
}

/// `{app-id}/{partition}/{YYYY}/{MM}/{dd}/{hh}/{mm}/{file...}` → (partition, minute).
pub(super) fn parse_blob_layout(rel: &str) -> Option<(u32, Nanos)> {
    let segs: Vec<&str> = rel.split('/').collect();
    if segs.len() < 8 {
        return None;
    }
    // the layout may sit below a prefix: match from the end
    let partition = segs[segs.len() - 7].parse::<u32>().ok()?;
    Some((partition, minute_of_folders(&segs[segs.len() - 6..segs.len() - 1])?))
}

/// `{YYYY}/{MM}/{dd}/{hh}/{mm}/{file}`, a path relative to a partition folder → the minute.
pub(super) fn parse_minute_path(rel: &str) -> Option<Nanos> {
    let segs: Vec<&str> = rel.split('/').collect();
    if segs.len() < 6 {
        return None;
    }
    minute_of_folders(&segs[segs.len() - 6..segs.len() - 1])
}

/// A minute key `YYYY/MM/dd/hh/mm`, as the layout's folders write it, as a time.
pub(super) fn parse_minute_key(key: &str) -> Option<Nanos> {
    minute_of_folders(&key.split('/').collect::<Vec<_>>())
}

/// The minute that folders `[YYYY, MM, dd, hh, mm]` name.
fn minute_of_folders(folders: &[&str]) -> Option<Nanos> {
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>().ok()).flatten()
    };
    let [y, mo, d, h, mi] = folders else { return None };
    let ts = format!("{:04}-{:02}-{:02}T{:02}:{:02}:00Z", num(y, 4)?, num(mo, 2)?, num(d, 2)?, num(h, 2)?, num(mi, 2)?);
    crate::time::parse_rfc3339(&ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_layout_paths() {
        let (p, m) = parse_blob_layout("6e9d8f3c-2b1a/3/2026/11/01/13/05/a1b2.json").unwrap();
        assert_eq!(p, 3);
        assert_eq!(crate::time::format_rfc3339(m), "2026-11-01T13:05:00.000Z");
        assert!(parse_blob_layout("prefix/app/0/2026/11/01/13/05/x.json").is_some(), "below a prefix");
        assert!(parse_blob_layout("app/x/2026/11/01/13/05/f").is_none());
        assert!(parse_blob_layout("app/0/26/11/01/13/05/f").is_none());
        assert!(parse_blob_layout("export.jsonl").is_none());
        // below a partition folder (follow lists each one, wherever the URL points)
        assert_eq!(parse_minute_path("2026/11/01/13/05/a1b2.json"), Some(m));
        assert!(parse_minute_path("0/2026/11/01/13/05/a1b2.json").is_some(), "the file's own folders decide");
        assert!(parse_minute_path("2026/11/01/13/a1b2.json").is_none());
        assert!(parse_minute_path("2026/11/1/13/05/a1b2.json").is_none());
    }
}
