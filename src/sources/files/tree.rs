//! Listing IoT Central's blob export layout from a point in time (`follow`), one folder level
//! at a time, so that a listing never reaches the folders before that point, however many years
//! of export lie there: the partition folders are found by listing a few levels below the URL
//! (`{app-id}/{partition}`, recognised by their year folders), then each partition's year, month,
//! day and hour folders are listed with a delimiter and only those at or after the start minute
//! are entered; an hour folder's files are listed whole (at most an hour of exports before the
//! start minute is listed again, never more).
//!
//! Minutes are compared as the layout writes them (`YYYY/MM/dd/hh/mm`, zero-padded), so a
//! folder's path prefix compares with a minute's as their times do.

use anyhow::Context;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};
use prometheus_client::metrics::counter::Counter;

use crate::event::Nanos;
use crate::storage::Location;

/// How many folder levels below the URL partition folders are looked for (`{app-id}/{partition}`
/// is two; one more allows a prefix above the application's folder).
const SEARCH_DEPTH: usize = 3;

/// A partition folder of the layout.
#[derive(Debug, Clone)]
pub(super) struct PartitionDir {
    /// Its path relative to the URL (`{app-id}/{partition}`; empty when the URL is the folder).
    pub(super) rel: String,
    pub(super) path: Path,
    pub(super) partition: u32,
    /// Its year folders, from the listing that found it.
    years: Vec<String>,
}

/// What listings cost: requests made and entries (objects and folders) returned (the
/// `source_list_requests` and `source_listed_entries` metrics).
#[derive(Debug, Clone, Default)]
pub(super) struct ListCounts {
    pub(super) requests: Counter,
    pub(super) entries: Counter,
}

impl ListCounts {
    /// The counters of a component.
    pub(super) fn of(label: &crate::metrics::ComponentLabel) -> ListCounts {
        let m = crate::metrics::global();
        ListCounts {
            requests: m.list_requests.get_or_create(label).clone(),
            entries: m.listed_entries.get_or_create(label).clone(),
        }
    }
}

/// Lists one location's layout, counting each listing.
pub(super) struct Tree<'a> {
    pub(super) loc: &'a Location,
    pub(super) counts: &'a ListCounts,
}

/// A minute as the layout writes its folders: `YYYY/MM/dd/hh/mm`.
pub(super) fn minute_key(t: Nanos) -> String {
    crate::time::to_chrono(t).format("%Y/%m/%d/%H/%M").to_string()
}

impl Tree<'_> {
    fn count(&self, entries: usize) {
        self.counts.requests.inc();
        self.counts.entries.inc_by(entries as u64);
    }

    /// The names of the sub-folders of `dir` (hidden ones, starting with `.` or `_`, left out).
    async fn folders(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        let listed = match self.loc.store.list_with_delimiter(Some(dir)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.loc.describe(dir))),
        };
        self.count(listed.common_prefixes.len() + listed.objects.len());
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| !n.starts_with('.') && !n.starts_with('_'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object below `dir`.
    async fn objects(&self, dir: &Path) -> anyhow::Result<Vec<ObjectMeta>> {
        let listed: Vec<ObjectMeta> = match self.loc.store.list(Some(dir)).try_collect().await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.loc.describe(dir))),
        };
        self.count(listed.len());
        Ok(listed)
    }

    /// The partition folders below the URL.
    pub(super) async fn partitions(&self) -> anyhow::Result<Vec<PartitionDir>> {
        let mut found = Vec::new();
        let mut level: Vec<Path> = vec![self.loc.prefix.clone()];
        for depth in 0..=SEARCH_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                let children = self.folders(&dir).await?;
                let name = dir.filename().unwrap_or("");
                let partition = name.parse::<u32>().ok().filter(|_| name.bytes().all(|b| b.is_ascii_digit()));
                let years: Vec<String> = children.iter().filter(|c| is_number(c, 4)).cloned().collect();
                match partition {
                    Some(partition) if !years.is_empty() => {
                        found.push(PartitionDir { rel: self.loc.relative(&dir), path: dir, partition, years })
                    }
                    _ if depth < SEARCH_DEPTH => next.extend(children.iter().map(|c| dir.clone().join(c.as_str()))),
                    _ => {}
                }
            }
            level = next;
        }
        found.sort_by(|a, b| (a.partition, &a.rel).cmp(&(b.partition, &b.rel)));
        Ok(found)
    }

    /// The files of partition folder `part` in minute folders from `start` to `end` (inclusive;
    /// `YYYY/MM/dd/hh/mm` keys, `None`: unbounded).
    pub(super) async fn files(
        &self,
        part: &PartitionDir,
        start: Option<&str>,
        end: Option<&str>,
    ) -> anyhow::Result<Vec<ObjectMeta>> {
        // a folder path of `n` characters is kept when its range of minutes meets [start, end]
        let keep = |p: &str| {
            start.is_none_or(|s| p >= &s[..p.len().min(s.len())]) && end.is_none_or(|e| p <= &e[..p.len().min(e.len())])
        };
        let mut prefixes: Vec<String> = part.years.iter().filter(|y| keep(y)).cloned().collect();
        // months, days, hours: two digits each
        for _ in 0..3 {
            let mut next = Vec::new();
            for p in prefixes {
                let dir = child(&part.path, &p);
                for c in self.folders(&dir).await?.into_iter().filter(|c| is_number(c, 2)) {
                    let key = format!("{p}/{c}");
                    if keep(&key) {
                        next.push(key);
                    }
                }
            }
            prefixes = next;
        }
        let mut out = Vec::new();
        for hour in prefixes {
            out.extend(self.objects(&child(&part.path, &hour)).await?);
        }
        Ok(out)
    }
}

fn child(base: &Path, rel: &str) -> Path {
    let mut p = base.clone();
    for seg in rel.split('/') {
        p = p.join(seg);
    }
    p
}

fn is_number(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn lists_from_a_minute_without_entering_older_folders() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("container/app-1");
        let mut files = Vec::new();
        for (part, minute) in
            [(0, "2024/01/01/00/00"), (0, "2026/11/01/12/59"), (0, "2026/11/01/13/04"), (1, "2026/11/01/13/05")]
        {
            let d = app.join(format!("{part}/{minute}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f.json"), "{}\n").unwrap();
            files.push(format!("{part}/{minute}/f.json"));
        }
        // not the layout: ignored
        std::fs::create_dir_all(app.join("other/x")).unwrap();
        std::fs::create_dir_all(dir.path().join("container/_staging/0/2026")).unwrap();
        let loc = crate::storage::open(dir.path().join("container").to_str().unwrap(), &BTreeMap::new()).unwrap();
        let counts = ListCounts::default();
        let tree = Tree { loc: &loc, counts: &counts };
        let parts = tree.partitions().await.unwrap();
        let rels: Vec<&str> = parts.iter().map(|p| p.rel.as_str()).collect();
        assert_eq!(rels, ["app-1/0", "app-1/1"]);
        let names = |v: Vec<ObjectMeta>| -> Vec<String> {
            let mut n: Vec<String> = v.iter().map(|m| loc.relative(&m.location)).collect();
            n.sort();
            n
        };
        let all = names(tree.files(&parts[0], None, None).await.unwrap());
        assert_eq!(all.len(), 3);
        let before = counts.entries.get();
        let from = names(tree.files(&parts[0], Some("2026/11/01/13/03"), None).await.unwrap());
        // the hour of the start minute is listed whole; older hours, days and years are not
        assert_eq!(from, ["app-1/0/2026/11/01/13/04/f.json"]);
        let entries = counts.entries.get() - before;
        assert!(entries <= 6, "{entries} entries listed");
        let to = names(tree.files(&parts[0], None, Some("2025/01/01/00/00")).await.unwrap());
        assert_eq!(to, ["app-1/0/2024/01/01/00/00/f.json"]);
    }
}
