//! One kind's list and watch, kept going for the sidecar's life: a paged list, then a
//! watch from the list's resource version, resumed from the last version seen
//! (events and bookmarks) whenever it ends or breaks, and a fresh list when the API
//! server answers 410 Gone (the version has been compacted away). Errors back off
//! and keep the last known records: traffic goes on with what was known.

use std::{collections::HashMap, fmt::Debug, sync::Arc, time::Duration};

use futures_util::{StreamExt, TryStreamExt};
use kube::{
    Api,
    api::{ListParams, WatchEvent, WatchParams},
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{metrics::KindMetrics, objects::Key};

/// Objects per list page.
const PAGE: u32 = 500;
/// A watch is closed by the server after this long (it is resumed at once).
const WATCH_SECONDS: u32 = 290;
/// Backoff after an error: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));
/// A watch the server ends sooner than this after it opened (its own timeout is
/// minutes) is resumed after the backoff, as an error is: an API server or a load
/// balancer that ends every watch at once must not make every sidecar spin.
const SHORT_WATCH: Duration = Duration::from_secs(5);

/// Where one watch keeps its records, and whom it tells of changes.
pub struct Sink<R> {
    /// The records, by namespace and name (every namespace's, for this kind).
    pub records: Arc<std::sync::Mutex<HashMap<Key, R>>>,
    /// The namespace watched; `None`: all.
    pub namespace: Option<Arc<str>>,
    /// Set once this watch's first full list is in `records`.
    pub listed: Arc<std::sync::atomic::AtomicBool>,
    /// Full lists done by every watch (the builder frees their garbage after one).
    pub lists: Arc<std::sync::atomic::AtomicU64>,
    /// Woken after every change.
    pub changed: Arc<Notify>,
    /// Counts and freshness.
    pub metrics: Arc<KindMetrics>,
}

/// Why a watch round ended.
enum End {
    /// The stream ended (the server's timeout): resume from the last version.
    Resume,
    /// The version is gone (410): list again.
    Relist,
    /// An error: back off, then resume.
    Failed(String),
}

/// Lists and watches `api` for ever, keeping `sink` current through `record` (which
/// keeps only what routing needs, or `None` to leave an object out).
pub async fn run<K, R>(api: Api<K>, what: String, record: fn(&K) -> Option<(Key, R)>, sink: Sink<R>)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    R: Clone + PartialEq + Send + 'static,
{
    let mut backoff = BACKOFF.0;
    let mut version: Option<String> = None;
    loop {
        let rv = match &version {
            Some(rv) => rv.clone(),
            None => match list(&api, record, &sink).await {
                Ok(rv) => {
                    info!(%what, objects = sink.metrics.objects(), "listed");
                    backoff = BACKOFF.0;
                    version = Some(rv.clone());
                    rv
                }
                Err(e) => {
                    sink.metrics.failed();
                    warn!(%what, error = %e, ?backoff, "list failed; keeping the last known state");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF.1);
                    continue;
                }
            },
        };
        let opened = tokio::time::Instant::now();
        match watch(&api, &rv, record, &sink, &mut version).await {
            End::Resume if opened.elapsed() < SHORT_WATCH => {
                debug!(%what, lasted = ?opened.elapsed(), ?backoff, "watch ended early; resuming after the backoff");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
            End::Resume => backoff = BACKOFF.0,
            End::Relist => {
                sink.metrics.relisted();
                info!(%what, "resource version expired (410 Gone): listing again");
                version = None;
            }
            End::Failed(e) => {
                sink.metrics.failed();
                warn!(%what, error = %e, ?backoff, "watch failed; keeping the last known state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// A full, paged list: the records and the list's version.
pub async fn list_all<K, R>(
    api: &Api<K>,
    record: fn(&K) -> Option<(Key, R)>,
) -> Result<(HashMap<Key, R>, String), kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let mut fresh = HashMap::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        fresh.extend(page.items.iter().filter_map(record));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((fresh, page.metadata.resource_version.unwrap_or_default())),
        }
    }
}

/// A full list that replaces this watch's records at once; returns its version.
async fn list<K, R>(
    api: &Api<K>,
    record: fn(&K) -> Option<(Key, R)>,
    sink: &Sink<R>,
) -> Result<String, kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let (fresh, rv) = list_all(api, record).await?;
    let n = {
        let mut records = lock(&sink.records);
        match &sink.namespace {
            None => *records = fresh,
            Some(ns) => {
                records.retain(|(n, _), _| n != ns);
                records.extend(fresh);
            }
        }
        records.len()
    };
    sink.metrics.listed(n);
    sink.listed
        .store(true, std::sync::atomic::Ordering::Relaxed);
    sink.lists
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sink.changed.notify_one();
    Ok(rv)
}

/// One watch from `rv` until it ends; `version` follows every event and bookmark.
async fn watch<K, R>(
    api: &Api<K>,
    rv: &str,
    record: fn(&K) -> Option<(Key, R)>,
    sink: &Sink<R>,
    version: &mut Option<String>,
) -> End
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    R: Clone + PartialEq,
{
    let params = WatchParams {
        timeout: Some(WATCH_SECONDS),
        bookmarks: true,
        ..WatchParams::default()
    };
    let stream = match api.watch(&params, rv).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) if e.code == 410 => return End::Relist,
        Err(e) => return End::Failed(e.to_string()),
    };
    sink.metrics.fresh();
    let mut stream = std::pin::pin!(stream.into_stream());
    loop {
        let event = match stream.next().await {
            None => return End::Resume,
            Some(Err(e)) => return End::Failed(e.to_string()),
            Some(Ok(event)) => event,
        };
        sink.metrics.fresh();
        let (object, deleted) = match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
            WatchEvent::Deleted(o) => (o, true),
            WatchEvent::Bookmark(b) => {
                *version = Some(b.metadata.resource_version);
                continue;
            }
            WatchEvent::Error(e) if e.code == 410 => return End::Relist,
            WatchEvent::Error(e) => return End::Failed(format!("{} ({})", e.message, e.code)),
        };
        if let Some(rv) = object.meta().resource_version.clone() {
            *version = Some(rv);
        }
        sink.metrics.event();
        // The record is made before the lock: the builder waits on it, not on parsing.
        let update = if deleted { None } else { record(&object) };
        let meta = object.meta();
        let changed = {
            let mut records = lock(&sink.records);
            let changed = match update {
                Some((key, r)) if records.get(&key) == Some(&r) => false,
                Some((key, r)) => {
                    records.insert(key, r);
                    true
                }
                // Deleted, or now without what routing needs (no IP any more, say).
                None => match meta.namespace.as_deref().zip(meta.name.as_deref()) {
                    Some((n, m)) => records.remove(&(Arc::from(n), Arc::from(m))).is_some(),
                    None => false,
                },
            };
            sink.metrics.set_objects(records.len());
            changed
        };
        if changed {
            debug!(deleted, "record changed");
            sink.changed.notify_one();
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
