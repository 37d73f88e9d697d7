//! Topic directories on disk: which incarnation of a name a directory holds (its `topic-id`
//! file), directories the local metadata does not know (moved to quarantine, never deleted),
//! and removing a deleted incarnation's data (renamed into trash first, so a crash leaves
//! either the whole directory or none of it where topics live).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{QUARANTINE_DIR, Registry, TOPIC_ID_FILE, TOPICS_DIR, TRASH_DIR};
use crate::error::{BrokerError, Result};

impl Registry {
    /// Moves aside the topic directories whose creation the local metadata log does not
    /// hold. They are never deleted here: this view is not current at start (the local log
    /// may have lost its tail to recovery, and with it creations the cluster committed), so
    /// they go to `quarantine/<name>.<topic id>` for an operator to restore or remove.
    pub(super) fn remove_unknown_dirs(&self, known: &BTreeSet<String>) -> anyhow::Result<()> {
        let trash = self.options.data_dir.join(TRASH_DIR);
        if trash.exists() {
            std::fs::remove_dir_all(&trash)?;
        }
        let dir = self.topics_dir();
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                let target = quarantine_dir_exclusive(&self.options.data_dir, &name, &entry.path())?;
                tracing::warn!(topic = %name, to = %target.display(), "the metadata log here does not know this topic; moving its data to quarantine (not deleted)");
                std::fs::rename(entry.path(), &target)?;
            }
        }
        Ok(())
    }
}

/// What a topic directory holds, as far as opening incarnation `id` is concerned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TopicDir {
    /// It holds `id` (now marked, if it was new).
    Ready,
    /// It holds another incarnation of the name, whose id this is: left untouched.
    Other(String),
}

/// Why a replica of incarnation `id` is not opened in a directory that holds `held`.
pub(super) fn other_incarnation_reason(held: &str) -> String {
    format!(
        "the topic's directory holds another incarnation of the name (topic id {held}); it is kept until that incarnation's deletion applies here"
    )
}

/// Makes sure the directory of topic `name` holds the incarnation `id`: moved back from
/// quarantine if a start put it there (see [`restore_quarantined`]), else created and marked
/// if there is none. A directory holding another incarnation is never deleted here, whether
/// that one is earlier or later than `id`, or unknown to this broker: the view applying `id`
/// may be stale, and data goes only through its own incarnation's `TopicDeleted` (see
/// [`remove_topic_data`]). Blocking.
pub(super) fn prepare_topic_dir(data_dir: &Path, name: &str, id: &str) -> std::io::Result<TopicDir> {
    restore_quarantined(data_dir, name, id)?;
    let dir = data_dir.join(TOPICS_DIR).join(name);
    let marker = dir.join(TOPIC_ID_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(found) if found.trim() == id => return Ok(TopicDir::Ready),
        Ok(found) => return Ok(TopicDir::Other(found.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(&dir)?;
    conveyor_storage::replace_file_durably(&dir, TOPIC_ID_FILE, id.as_bytes()).map_err(std::io::Error::other)?;
    Ok(TopicDir::Ready)
}

/// Moves `quarantine/<name>.<id>` back to the topic's directory, if the topic has none: a
/// start quarantined it because the local metadata log did not hold its creation yet (see
/// [`Registry::remove_unknown_dirs`]), and that creation, of this same incarnation, now
/// applies. Opening a fresh replica instead would forget the replica's vote and term and
/// count an empty log toward the group's quorum. Returns whether it moved. Blocking.
pub(super) fn restore_quarantined(data_dir: &Path, name: &str, id: &str) -> std::io::Result<bool> {
    let topics = data_dir.join(TOPICS_DIR);
    let target = topics.join(name);
    let quarantine = data_dir.join(QUARANTINE_DIR);
    let source = quarantine.join(format!("{name}.{id}"));
    if id.is_empty() || target.exists() || !source.is_dir() {
        return Ok(false);
    }
    match std::fs::read_to_string(source.join(TOPIC_ID_FILE)) {
        Ok(found) if found.trim() == id => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(&topics)?;
    std::fs::rename(&source, &target)?;
    // Both entries durable: a crash must not leave the replica in neither place.
    std::fs::File::open(&topics)?.sync_all()?;
    std::fs::File::open(&quarantine)?.sync_all()?;
    tracing::warn!(topic = %name, id = %id, from = %source.display(), "the topic's creation now applies here: its quarantined directory is moved back");
    Ok(true)
}

/// A free path in the quarantine folder for the directory of topic `name` at `source`.
pub(super) fn quarantine_dir_exclusive(data_dir: &Path, name: &str, source: &Path) -> std::io::Result<PathBuf> {
    let quarantine = data_dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&quarantine)?;
    let id = std::fs::read_to_string(source.join(TOPIC_ID_FILE)).unwrap_or_default();
    let id = id.trim();
    let base = if id.is_empty() {
        name.to_string()
    } else {
        format!("{name}.{id}")
    };
    let mut target = quarantine.join(&base);
    let mut n = 1;
    while target.exists() {
        target = quarantine.join(format!("{base}.{n}"));
        n += 1;
    }
    Ok(target)
}

/// Moves a deleted topic's directory to the trash and removes it, if it holds incarnation
/// `id` of the topic (or no data at all). Blocking; idempotent.
pub(super) fn remove_topic_data(data_dir: &Path, name: &str, id: &str) -> Result<()> {
    let io = |e: std::io::Error| BrokerError::Internal(format!("removing data of topic '{name}': {e}"));
    let source = data_dir.join(TOPICS_DIR).join(name);
    match std::fs::read_to_string(source.join(TOPIC_ID_FILE)) {
        Ok(found) if found.trim() != id => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if !source.exists() {
        return Ok(());
    }
    let trash = data_dir.join(TRASH_DIR);
    std::fs::create_dir_all(&trash).map_err(io)?;
    let target = trash.join(format!("{name}-{id}"));
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io)?;
    }
    std::fs::rename(&source, &target).map_err(io)?;
    std::fs::remove_dir_all(&target).map_err(io)
}
