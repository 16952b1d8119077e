//! Cloud storage that rides out outages.
//!
//! object_store's HTTP client already retries one request a few times (connect errors, 5xx and
//! 429 answers, timeouts of idempotent requests; about a minute in all). An outage longer than
//! that would end the pipeline. This layer sits on top: a request that still fails with a
//! transient error (`object_store::Error::Generic`: unreachable, timed out, 5xx) is sent again
//! with a capped backoff until it succeeds. The component waiting on it stalls, back-pressure
//! stops the source (a broker keeps the backlog, unacknowledged), and nothing is lost or written
//! twice: every retried request is idempotent (puts overwrite, multipart parts are resent under
//! their own index, renames that already happened are recognised by the callers). Answers that
//! retrying cannot change (not found, already exists, precondition failed, forbidden,
//! unauthenticated) are returned at once.
//!
//! A body that breaks off with a transient error after object_store's own resumption is read on
//! from where it broke, by a ranged get of the same object (`if_match` its ETag: export blobs
//! are written whole, so a changed ETag is a different object, an error), retried like any
//! request ([`Retrying::resuming`]). Before, the reader got the error, and a file source
//! dead-lettered the rest of the file.
//!
//! While a request is failing, or has had no answer for [`STALLED`], `/health/ready` carries a
//! component `storage LOCATION` that is not ready and says what is wrong; it is removed when
//! requests succeed again.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// A request without an answer for this long makes the location not ready (it keeps waiting).
pub const STALLED: Duration = Duration::from_secs(5);
const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Whether sending the same request again may succeed.
pub fn transient(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::Generic { source, .. } => !ignores_the_range(&source.to_string()),
        object_store::Error::JoinError { .. } => true,
        _ => false,
    }
}

/// A ranged get answered without the range asked for (a server or proxy that ignores `Range`):
/// asked again, it answers the same. object_store's error type for it is private: it is known by
/// its words.
fn ignores_the_range(text: &str) -> bool {
    text.contains("non-partial response when range requested")
        || text.contains("Content-Range")
        || text.starts_with("Range started at")
        || text.starts_with("Wanted range starting at")
        || text.starts_with("Invalid range")
        || (text.starts_with("Requested ") && text.contains(", got "))
}

/// The health of one location, shared by its requests.
#[derive(Debug)]
struct Health {
    component: String,
    outage: Mutex<Option<Instant>>,
    /// The first wait before sending again (doubling up to [`MAX_DELAY`]).
    first_delay: Duration,
}

impl Health {
    fn trouble(&self, detail: &str) {
        let since = *self.outage.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
        crate::metrics::set_ready(
            &self.component,
            false,
            &format!("{detail} (trouble for {} s; retrying, nothing is lost)", since.elapsed().as_secs()),
        );
    }

    fn fine(&self) {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(since) = outage.take() {
            crate::metrics::clear_ready(&self.component);
            tracing::info!(location = %self.component, after_s = since.elapsed().as_secs(), "storage answers again");
        }
    }
}

/// Marks its location fine when dropped.
struct Recovered(Arc<Health>);

impl Drop for Recovered {
    fn drop(&mut self) {
        self.0.fine();
    }
}

/// An object store whose transient failures are retried until they pass.
#[derive(Clone)]
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    parts: Option<Arc<dyn MultipartStore>>,
    health: Arc<Health>,
}

impl std::fmt::Debug for Retrying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrying").field("inner", &self.inner).field("health", &self.health).finish()
    }
}

impl std::fmt::Display for Retrying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Retrying({})", self.inner)
    }
}

impl Retrying {
    /// `parts` is the same store's multipart API, so that a failed part is resent under its own
    /// index (without it, multipart uploads are passed through unretried).
    pub fn new(inner: Arc<dyn ObjectStore>, parts: Option<Arc<dyn MultipartStore>>, location: &str) -> Retrying {
        Retrying {
            inner,
            parts,
            health: Arc::new(Health {
                component: format!("storage {location}"),
                outage: Mutex::new(None),
                first_delay: FIRST_DELAY,
            }),
        }
    }

    /// `body`, the stream of a get that returned `range` of the object `meta`, read on from
    /// where it breaks off with a transient error.
    fn resuming(
        &self,
        location: &Path,
        options: &GetOptions,
        meta: &ObjectMeta,
        range: Range<u64>,
        body: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        // without an ETag or a version, bytes read on could be another object's: such a body
        // is only checked for its length
        let can_resume = meta.e_tag.is_some() || meta.version.is_some();
        let this = self.clone();
        let location = location.clone();
        let same = GetOptions { if_match: meta.e_tag.clone(), version: meta.version.clone(), ..options.clone() };
        let end = range.end;
        // (the body, where it is, the wait before reading on again after a body that broke off
        // before giving a byte)
        let start = (body, range.start, Duration::ZERO);
        futures::stream::unfold(Some(start), move |state| {
            let (this, location, same) = (this.clone(), location.clone(), same.clone());
            async move {
                let (mut body, mut at, mut idle) = state?;
                loop {
                    let e = match body.next().await {
                        Some(Ok(b)) => {
                            at += b.len() as u64;
                            // an empty chunk is no progress: the wait before reading on stays
                            let idle = if b.is_empty() { idle } else { Duration::ZERO };
                            return Some((Ok(b), Some((body, at, idle))));
                        }
                        None if at >= end => return None,
                        // broke off after its last byte: the body is whole (an empty range
                        // cannot be asked for)
                        Some(Err(e)) if at >= end && transient(&e) => return None,
                        None => object_store::Error::Generic {
                            store: "storage",
                            source: format!("{location}: the body ended at byte {at} of {end}").into(),
                        },
                        Some(Err(e)) => e,
                    };
                    if !transient(&e) || !can_resume {
                        return Some((Err(e), None));
                    }
                    tracing::warn!(
                        location = %this.health.component, path = %location, at, error = %e,
                        "reading an object broke off; reading on from where it broke"
                    );
                    this.health.trouble(&format!("reading {location} broke off at byte {at}: {e}"));
                    // however this attempt ends (read on, failed for good, or dropped while
                    // waiting), the location is not left marked as in trouble by it
                    let _recovered = Recovered(this.health.clone());
                    tokio::time::sleep(idle).await;
                    idle = (idle * 2).clamp(this.health.first_delay, MAX_DELAY);
                    let opts = GetOptions { range: Some((at..end).into()), ..same.clone() };
                    let again =
                        retry(&this.health, "read on in", &location, || this.inner.get_opts(&location, opts.clone()));
                    body = match again.await.map(|r| r.payload) {
                        Ok(GetResultPayload::Stream(b)) => b,
                        Ok(_) => {
                            let source = format!("{location}: a resumed read answered with a file").into();
                            return Some((Err(object_store::Error::NotSupported { source }), None));
                        }
                        Err(e) => return Some((Err(e), None)),
                    };
                }
            }
        })
        // a consumer may poll again after the end (delta-rs does), which `unfold` forbids
        .fuse()
        .boxed()
    }

    async fn again<T, F, Fut>(&self, what: &str, path: &Path, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        retry(&self.health, what, path, op).await
    }
}

async fn retry<T, F, Fut>(health: &Health, what: &str, path: &Path, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = health.first_delay;
    let mut attempt = 1u64;
    loop {
        let fut = op();
        tokio::pin!(fut);
        let started = Instant::now();
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                _ = tokio::time::sleep(STALLED) => health.trouble(&format!(
                    "{what} {path}: no answer for {} s", started.elapsed().as_secs()
                )),
            }
        };
        match result {
            Ok(v) => {
                health.fine();
                return Ok(v);
            }
            Err(e) if transient(&e) => {
                tracing::warn!(
                    location = %health.component, %path, attempt, retry_in_ms = delay.as_millis() as u64,
                    error = %e, "storage request failed; retrying"
                );
                health.trouble(&format!("{what} {path} failed (attempt {attempt}): {e}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELAY);
                attempt += 1;
            }
            Err(e) => {
                if attempt > 1 {
                    health.fine();
                }
                return Err(e);
            }
        }
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.again("put", location, || self.inner.put_opts(location, payload.clone(), opts.clone())).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        let plain = opts.tags.encoded().is_empty() && opts.attributes.is_empty();
        match &self.parts {
            Some(parts) if plain => {
                let id = self.again("start an upload of", location, || parts.create_multipart(location)).await?;
                Ok(Box::new(Upload {
                    parts: parts.clone(),
                    health: self.health.clone(),
                    path: location.clone(),
                    id,
                    done: Arc::new(Mutex::new(Vec::new())),
                    next: 0,
                }))
            }
            _ => self.inner.put_multipart_opts(location, opts).await,
        }
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let got = self.again("get", location, || self.inner.get_opts(location, options.clone())).await?;
        let GetResult { payload, meta, range, attributes } = got;
        let payload = match payload {
            GetResultPayload::Stream(body) if !options.head => {
                GetResultPayload::Stream(self.resuming(location, &options, &meta, range.clone(), body))
            }
            other => other,
        };
        Ok(GetResult { payload, meta, range, attributes })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.again("get", location, || self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let this = self.clone();
        locations
            .then(move |p| {
                let this = this.clone();
                async move {
                    let p = p?;
                    this.again("delete", &p, || {
                        let p = p.clone();
                        let one = futures::stream::once(async move { Ok(p) }).boxed();
                        let mut s = this.inner.delete_stream(one);
                        async move { s.next().await.unwrap_or_else(|| Err(gone("delete"))) }
                    })
                    .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let this = self.clone();
        let prefix = prefix.cloned();
        listed(async move {
            let at = prefix.clone().unwrap_or_default();
            this.again("list", &at, || this.inner.list(prefix.as_ref()).try_collect::<Vec<_>>()).await
        })
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        let this = self.clone();
        let (prefix, offset) = (prefix.cloned(), offset.clone());
        listed(async move {
            let at = prefix.clone().unwrap_or_default();
            this.again("list", &at, || this.inner.list_with_offset(prefix.as_ref(), &offset).try_collect::<Vec<_>>())
                .await
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        self.again("list", &at, || self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.again("copy", from, || self.inner.copy_opts(from, to, options.clone())).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.again("rename", from, || self.inner.rename_opts(from, to, options.clone())).await
    }
}

/// A listing retried as a whole (a stream cannot be resumed where it broke), then streamed.
fn listed(
    all: impl std::future::Future<Output = Result<Vec<ObjectMeta>>> + Send + 'static,
) -> BoxStream<'static, Result<ObjectMeta>> {
    futures::stream::once(all)
        .map(|r| match r {
            Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
}

fn gone(what: &str) -> object_store::Error {
    object_store::Error::Generic { store: "Retrying", source: format!("{what} gave no answer").into() }
}

/// A multipart upload whose parts are sent by index, so that a failed part is sent again as the
/// same part.
struct Upload {
    parts: Arc<dyn MultipartStore>,
    health: Arc<Health>,
    path: Path,
    id: MultipartId,
    done: Arc<Mutex<Vec<Option<PartId>>>>,
    next: usize,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload").field("path", &self.path).field("id", &self.id).field("next", &self.next).finish()
    }
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let idx = self.next;
        self.next += 1;
        let (parts, health, path, id, done) =
            (self.parts.clone(), self.health.clone(), self.path.clone(), self.id.clone(), self.done.clone());
        Box::pin(async move {
            let part =
                retry(&health, "upload a part of", &path, || parts.put_part(&path, &id, idx, data.clone())).await?;
            let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
            if done.len() <= idx {
                done.resize(idx + 1, None);
            }
            done[idx] = Some(part);
            Ok(())
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let parts: Vec<PartId> = {
            let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            match done.iter().cloned().collect::<Option<Vec<_>>>() {
                Some(p) if p.len() == self.next => p,
                _ => {
                    return Err(object_store::Error::Generic {
                        store: "Retrying",
                        source: format!("completing {} before all its parts were uploaded", self.path).into(),
                    })
                }
            }
        };
        let (store, path, id) = (&self.parts, &self.path, &self.id);
        retry(&self.health, "complete the upload of", path, || store.complete_multipart(path, id, parts.clone())).await
    }

    async fn abort(&mut self) -> Result<()> {
        self.parts.abort_multipart(&self.path, &self.id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory store whose first `fail` requests fail like an unreachable server.
    #[derive(Debug)]
    struct Flaky {
        inner: InMemory,
        fail: AtomicUsize,
        calls: AtomicUsize,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Flaky")
        }
    }

    impl Flaky {
        fn check(&self) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let left = self.fail.load(Ordering::SeqCst);
            if left > 0 {
                self.fail.store(left - 1, Ordering::SeqCst);
                return Err(object_store::Error::Generic { store: "Flaky", source: "connection refused".into() });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
            self.check()?;
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(&self, l: &Path, o: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
            self.check()?;
            self.inner.get_opts(l, o).await
        }
        fn delete_stream(&self, l: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(l)
        }
        fn list(&self, p: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            match self.check() {
                Ok(()) => self.inner.list(p),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            }
        }
        async fn list_with_delimiter(&self, p: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        async fn copy_opts(&self, f: &Path, t: &Path, o: CopyOptions) -> Result<()> {
            self.inner.copy_opts(f, t, o).await
        }
    }

    /// A store that waits 50 ms before sending again.
    fn quick(inner: Arc<dyn ObjectStore>, parts: Option<Arc<dyn MultipartStore>>, location: &str) -> Retrying {
        let mut r = Retrying::new(inner, parts, location);
        Arc::get_mut(&mut r.health).expect("not shared yet").first_delay = Duration::from_millis(50);
        r
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_reported_until_they_pass() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicUsize::new(4), calls: AtomicUsize::new(0) });
        let store = quick(flaky.clone(), None, "mem://unit-retry");
        let path = Path::from("a/b");
        let put = tokio::spawn({
            let store = store.clone();
            let path = path.clone();
            async move { store.put(&path, PutPayload::from_static(b"x")).await }
        });
        // while it fails, the location is not ready and says why (the first wait is 50 ms)
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (ready, parts) = crate::metrics::readiness();
        let me = parts.iter().find(|(n, _, _)| n == "storage mem://unit-retry").expect("reported");
        assert!(!ready && !me.1, "{parts:?}");
        assert!(me.2.contains("put a/b failed (attempt 1): Generic Flaky error: connection refused"), "{}", me.2);
        put.await.unwrap().unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 5);
        assert!(!crate::metrics::readiness().1.iter().any(|(n, _, _)| n == "storage mem://unit-retry"));
        // a listing is retried as a whole
        flaky.fail.store(2, Ordering::SeqCst);
        let listed: Vec<_> = store.list(None).try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(store.get(&path).await.unwrap().bytes().await.unwrap().as_ref(), b"x");
    }

    #[tokio::test]
    async fn answers_that_retrying_cannot_change_are_returned_at_once() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicUsize::new(0), calls: AtomicUsize::new(0) });
        let store = quick(flaky.clone(), None, "mem://unit-final");
        let e = store.get(&Path::from("missing")).await.unwrap_err();
        assert!(matches!(e, object_store::Error::NotFound { .. }), "{e}");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn multipart_parts_are_resent_under_their_own_index() {
        // a multipart store whose first part uploads fail; it keeps the parts by index itself
        // (object_store 0.13.2's InMemory panics on a part that arrives before a lower one) and
        // completes by putting them, in the order of the part ids given, into `inner`
        #[derive(Debug)]
        struct FlakyParts {
            inner: InMemory,
            fail: AtomicUsize,
            parts: std::sync::Mutex<std::collections::BTreeMap<usize, bytes::Bytes>>,
        }
        #[async_trait]
        impl MultipartStore for FlakyParts {
            async fn create_multipart(&self, _p: &Path) -> Result<MultipartId> {
                Ok("upload".into())
            }
            async fn put_part(&self, _p: &Path, _id: &MultipartId, idx: usize, data: PutPayload) -> Result<PartId> {
                if self.fail.load(Ordering::SeqCst) > 0 {
                    self.fail.fetch_sub(1, Ordering::SeqCst);
                    return Err(object_store::Error::Generic { store: "FlakyParts", source: "reset".into() });
                }
                let bytes: bytes::Bytes = data.into_iter().flatten().collect::<Vec<u8>>().into();
                self.parts.lock().unwrap().insert(idx, bytes);
                Ok(PartId { content_id: idx.to_string() })
            }
            async fn complete_multipart(&self, p: &Path, _id: &MultipartId, parts: Vec<PartId>) -> Result<PutResult> {
                let stored = std::mem::take(&mut *self.parts.lock().unwrap());
                let mut all = Vec::new();
                for part in parts {
                    all.extend_from_slice(&stored[&part.content_id.parse::<usize>().unwrap()]);
                }
                self.inner.put(p, all.into()).await
            }
            async fn abort_multipart(&self, _p: &Path, _id: &MultipartId) -> Result<()> {
                self.parts.lock().unwrap().clear();
                Ok(())
            }
        }
        let mem = InMemory::new();
        let parts = Arc::new(FlakyParts { inner: mem.clone(), fail: AtomicUsize::new(3), parts: Default::default() });
        let store = quick(Arc::new(mem.clone()), Some(parts), "mem://unit-parts");
        let path = Path::from("big");
        let mut up = store.put_multipart(&path).await.unwrap();
        let (a, b) = (up.put_part(PutPayload::from_static(b"hello ")), up.put_part(PutPayload::from_static(b"world")));
        futures::future::try_join(a, b).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(mem.get(&path).await.unwrap().bytes().await.unwrap().as_ref(), b"hello world");
    }

    /// A store whose get bodies break off after 3,000 bytes (`breaks` of them), after which
    /// the next `refuse` gets are refused (the outage goes on), and the object is replaced if
    /// `replace` is set.
    #[derive(Debug)]
    struct Breaking {
        inner: InMemory,
        breaks: AtomicUsize,
        refuse: AtomicUsize,
        replace: std::sync::atomic::AtomicBool,
        /// The body just ends, without an error.
        truncate: std::sync::atomic::AtomicBool,
        /// The answer has no ETag.
        no_etag: std::sync::atomic::AtomicBool,
        gets: AtomicUsize,
    }

    impl std::fmt::Display for Breaking {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Breaking")
        }
    }

    fn refused() -> object_store::Error {
        object_store::Error::Generic { store: "Breaking", source: "connection reset".into() }
    }

    #[async_trait]
    impl ObjectStore for Breaking {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(&self, l: &Path, o: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) > 0 {
                self.refuse.fetch_sub(1, Ordering::SeqCst);
                return Err(refused());
            }
            let got = self.inner.get_opts(l, o).await?;
            if self.breaks.load(Ordering::SeqCst) == 0 {
                return Ok(got);
            }
            self.breaks.fetch_sub(1, Ordering::SeqCst);
            self.refuse.store(3, Ordering::SeqCst);
            let (mut meta, range, attributes) = (got.meta.clone(), got.range.clone(), got.attributes.clone());
            if self.no_etag.load(Ordering::SeqCst) {
                meta.e_tag = None;
            }
            let all = got.bytes().await?;
            if self.replace.load(Ordering::SeqCst) {
                self.inner.put(l, PutPayload::from(vec![b'z'; all.len()])).await?;
            }
            let head = all.slice(..all.len().min(3000));
            let end = if self.truncate.load(Ordering::SeqCst) { vec![] } else { vec![Err(refused())] };
            let chunks: Vec<Result<Bytes>> =
                head.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).chain(end).collect();
            let payload = GetResultPayload::Stream(futures::stream::iter(chunks).boxed());
            Ok(GetResult { payload, meta, range, attributes })
        }
        fn delete_stream(&self, l: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(l)
        }
        fn list(&self, p: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(p)
        }
        async fn list_with_delimiter(&self, p: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        async fn copy_opts(&self, f: &Path, t: &Path, o: CopyOptions) -> Result<()> {
            self.inner.copy_opts(f, t, o).await
        }
    }

    fn breaking(breaks: usize, replace: bool) -> Arc<Breaking> {
        Arc::new(Breaking {
            inner: InMemory::new(),
            breaks: AtomicUsize::new(breaks),
            refuse: AtomicUsize::new(0),
            replace: std::sync::atomic::AtomicBool::new(replace),
            truncate: std::sync::atomic::AtomicBool::new(false),
            no_etag: std::sync::atomic::AtomicBool::new(false),
            gets: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_read_on_from_where_it_broke() {
        let store = breaking(0, false);
        let path = Path::from("export/0/2026/12/08/02/45/09_abc.json");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        store.inner.put(&path, PutPayload::from(data.clone())).await.unwrap();
        // the first body and the first resumed one break off, each followed by three refusals
        store.breaks.store(2, Ordering::SeqCst);
        let r = quick(store.clone(), None, "mem://unit-resume");
        let got = r.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got.as_ref() == data.as_slice(), "the bytes read on are the object's, in order");
        // 1 get, 3 refused + 1 resumed (breaks at 6,000), 3 refused + 1 resumed
        assert_eq!(store.gets.load(Ordering::SeqCst), 9);
        // a range is read on within its range
        store.breaks.store(1, Ordering::SeqCst);
        let part = r.get_range(&path, 1000..8000).await.unwrap();
        assert!(part.as_ref() == &data[1000..8000]);
        // the body may be polled again after its end (delta-rs does)
        let mut body = r.get(&path).await.unwrap().into_stream();
        while body.next().await.is_some() {}
        assert!(body.next().await.is_none() && body.next().await.is_none());
        // a body that just ends early is read on too
        store.truncate.store(true, Ordering::SeqCst);
        store.breaks.store(1, Ordering::SeqCst);
        assert!(r.get(&path).await.unwrap().bytes().await.unwrap().as_ref() == data.as_slice());
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_after_its_last_byte_is_whole() {
        let store = breaking(1, false);
        let path = Path::from("a/small.json");
        store.inner.put(&path, PutPayload::from(vec![b's'; 2_500])).await.unwrap();
        let r = quick(store.clone(), None, "mem://unit-small");
        let got = tokio::time::timeout(Duration::from_secs(10), async { r.get(&path).await?.bytes().await });
        assert_eq!(got.await.expect("no endless retry of an empty range").unwrap().len(), 2_500);
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        assert!(!crate::metrics::readiness().1.iter().any(|(n, _, _)| n == "storage mem://unit-small"));
    }

    #[tokio::test]
    async fn a_body_without_an_etag_is_not_read_on() {
        let store = breaking(1, false);
        store.no_etag.store(true, Ordering::SeqCst);
        let path = Path::from("a/untagged.json");
        store.inner.put(&path, PutPayload::from(vec![b'a'; 10_000])).await.unwrap();
        let r = quick(store.clone(), None, "mem://unit-untagged");
        let e = r.get(&path).await.unwrap().bytes().await.unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_server_that_ignores_the_range_is_not_asked_again() {
        let generic = |text: &str| object_store::Error::Generic { store: "S3", source: text.to_string().into() };
        assert!(!transient(&generic("Received non-partial response when range requested")));
        assert!(!transient(&generic("Requested 3000..10000, got 0..10000")));
        assert!(!transient(&generic("Range started at 10000 and ended at 10000")));
        assert!(transient(&generic("error sending request: connection refused")));
    }

    #[tokio::test]
    async fn a_body_is_not_read_on_from_an_object_replaced_meanwhile() {
        let store = breaking(1, true);
        let path = Path::from("a/replaced.json");
        store.inner.put(&path, PutPayload::from(vec![b'a'; 10_000])).await.unwrap();
        let r = quick(store.clone(), None, "mem://unit-replaced");
        let e = r.get(&path).await.unwrap().bytes().await.unwrap_err();
        assert!(matches!(e, object_store::Error::Precondition { .. }), "{e}");
        // the location is not left marked as in trouble by the attempt
        assert!(!crate::metrics::readiness().1.iter().any(|(n, _, _)| n == "storage mem://unit-replaced"));
    }
}
