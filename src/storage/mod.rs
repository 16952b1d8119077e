//! Object storage locations: a local path, or a `file://`, `s3://`, `az://` (also `abfs://`,
//! `azure://`) or `gs://` URL, opened as an `object_store` store plus a prefix inside it.
//!
//! Credentials and endpoints come from the standard environment variables of each cloud
//! (`AWS_*`, `AZURE_*`, `GOOGLE_*`, e.g. `AZURE_STORAGE_USE_EMULATOR=true` for Azurite or
//! `AWS_ENDPOINT`/`AWS_ALLOW_HTTP` for a local S3), and from a component's `storage:` options,
//! which take the same keys in lower case (`aws_region`, `azure_storage_account_name`, ...).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;

mod retry;
pub use retry::{transient, Retrying, STALLED};

/// Where a location lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Local,
    S3,
    Azure,
    Gcs,
}

/// An opened location.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// The same store without the outage retries of [`Retrying`]: for the start-up probe, which
    /// should fail at once with the reason rather than wait.
    direct: Arc<dyn ObjectStore>,
    /// Prefix inside the store (no leading or trailing slash).
    pub prefix: Path,
    pub scheme: Scheme,
    /// The location as the user wrote it, for messages.
    pub display: String,
    /// For local locations: the absolute folder (or file) path.
    pub local_path: Option<PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.display)
    }
}

/// The scheme of a location string, or an error naming what is wrong with it.
pub fn scheme_of(url: &str) -> Result<Scheme, String> {
    match url.split_once("://") {
        None => Ok(Scheme::Local),
        Some((s, rest)) => {
            if rest.is_empty() {
                return Err(format!("{url:?} has no bucket, container or path after the scheme"));
            }
            match s.to_ascii_lowercase().as_str() {
                "file" => Ok(Scheme::Local),
                "s3" | "s3a" => Ok(Scheme::S3),
                "az" | "azure" | "abfs" | "abfss" | "adl" => Ok(Scheme::Azure),
                "gs" => Ok(Scheme::Gcs),
                other => Err(format!(
                    "unsupported storage scheme {other:?} in {url:?} (use a local path, file://, s3://, az:// or gs://)"
                )),
            }
        }
    }
}

/// Opens a location. Local folders need not exist yet (sinks create them).
pub fn open(url: &str, options: &BTreeMap<String, String>) -> anyhow::Result<Location> {
    let scheme = scheme_of(url).map_err(anyhow::Error::msg)?;
    match scheme {
        Scheme::Local => {
            let path = url.strip_prefix("file://").unwrap_or(url);
            let path = PathBuf::from(path);
            let abs = if path.is_absolute() {
                path
            } else {
                std::env::current_dir().context("current directory")?.join(path)
            };
            let abs = normalize(&abs);
            let store = LocalFileSystem::new();
            let prefix =
                Path::from_absolute_path(&abs).with_context(|| format!("{} is not a usable path", abs.display()))?;
            let store: Arc<dyn ObjectStore> = Arc::new(store);
            Ok(Location {
                store: store.clone(),
                direct: store,
                prefix,
                scheme,
                display: url.to_string(),
                local_path: Some(abs),
            })
        }
        Scheme::S3 => {
            let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().with_context(|| format!("unknown S3 option {k:?}"))?, v);
            }
            Ok(cloud(Arc::new(b.build().with_context(|| format!("opening {url}"))?), url, &parsed, scheme))
        }
        Scheme::Azure => {
            let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().with_context(|| format!("unknown Azure option {k:?}"))?, v);
            }
            Ok(cloud(Arc::new(b.build().with_context(|| format!("opening {url}"))?), url, &parsed, scheme))
        }
        Scheme::Gcs => {
            let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().with_context(|| format!("unknown GCS option {k:?}"))?, v);
            }
            Ok(cloud(Arc::new(b.build().with_context(|| format!("opening {url}"))?), url, &parsed, scheme))
        }
    }
}

/// A cloud location: the store behind the outage retries of [`Retrying`] (which resends
/// multipart parts through the same store's multipart API), and the store itself for the probe.
fn cloud<S: ObjectStore + object_store::multipart::MultipartStore>(
    store: Arc<S>,
    url: &str,
    parsed: &url::Url,
    scheme: Scheme,
) -> Location {
    Location {
        store: Arc::new(Retrying::new(store.clone(), Some(store.clone()), url)),
        direct: store,
        prefix: url_prefix(parsed),
        scheme,
        display: url.to_string(),
        local_path: None,
    }
}

fn url_prefix(u: &url::Url) -> Path {
    let p = u.path().trim_matches('/');
    let decoded = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
    Path::from(decoded.as_ref())
}

/// Removes `.` and `..` components without touching the file system.
fn normalize(p: &std::path::Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl Location {
    /// A path below the prefix.
    pub fn child(&self, rel: &str) -> Path {
        let mut parts: Vec<String> = self.prefix.parts().map(|p| p.as_ref().to_string()).collect();
        parts.extend(rel.split('/').filter(|s| !s.is_empty()).map(str::to_string));
        Path::from_iter(parts)
    }

    /// The path relative to the prefix.
    pub fn relative(&self, p: &Path) -> String {
        match p.prefix_match(&self.prefix) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => p.to_string(),
        }
    }

    /// A readable name of an object: a local path, or `scheme://.../path`.
    pub fn describe(&self, p: &Path) -> String {
        match &self.local_path {
            Some(_) => format!("/{p}"),
            None => {
                let rel = self.relative(p);
                format!("{}/{}", self.display.trim_end_matches('/'), rel)
            }
        }
    }
}

/// Checks a location string offline (for validation): scheme and shape only.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("is empty".to_string());
    }
    scheme_of(url).map(|_| ())
}

/// Fails unless the location is reachable (used by sinks at start, for a clear early error).
pub async fn probe(loc: &Location) -> anyhow::Result<()> {
    if loc.scheme == Scheme::Local {
        return Ok(());
    }
    use futures::StreamExt;
    let mut s = loc.direct.list(Some(&loc.prefix));
    if let Some(Err(e)) = s.next().await {
        bail!("cannot list {}: {e}", loc.display);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("./out").unwrap(), Scheme::Local);
        assert_eq!(scheme_of("file:///tmp/x").unwrap(), Scheme::Local);
        assert_eq!(scheme_of("s3://bucket/p").unwrap(), Scheme::S3);
        assert_eq!(scheme_of("az://container/p").unwrap(), Scheme::Azure);
        assert_eq!(scheme_of("gs://b").unwrap(), Scheme::Gcs);
        assert!(scheme_of("ftp://x/y").unwrap_err().contains("unsupported storage scheme"));
        assert!(scheme_of("s3://").unwrap_err().contains("no bucket"));
    }

    #[test]
    fn local_paths_are_absolute_prefixes() {
        let loc = open("./a/../b/out", &BTreeMap::new()).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(loc.local_path.unwrap(), cwd.join("b/out"));
        assert!(loc.prefix.as_ref().ends_with("b/out"));
        let loc = open("file:///tmp/x", &BTreeMap::new()).unwrap();
        assert_eq!(loc.child("date=1/part.parquet").as_ref(), "tmp/x/date=1/part.parquet");
        assert_eq!(loc.relative(&loc.child("a/b")), "a/b");
    }

    #[test]
    fn cloud_urls_give_prefixes() {
        let mut o = BTreeMap::new();
        o.insert("aws_region".into(), "us-east-1".into());
        let loc = open("s3://bucket/exports/app", &o).unwrap();
        assert_eq!(loc.prefix.as_ref(), "exports/app");
        let mut o = BTreeMap::new();
        o.insert("azure_storage_use_emulator".into(), "true".into());
        let loc = open("az://container/x/y", &o).unwrap();
        assert_eq!(loc.prefix.as_ref(), "x/y");
        assert!(open("s3://bucket/x", &[("nonsense".to_string(), "1".to_string())].into()).is_err());
    }
}
