//! The topic registry: which topics exist, their configs and their partitions.
//!
//! # Persistence
//! Every change is first appended, fsynced, to the cluster metadata log
//! (`DATA/__cluster_metadata/0`, records are `conveyor.internal.v1.MetadataRecord`), then
//! applied in memory. On start the log is replayed; directories of topics the log does not
//! know (a crash mid-delete) are removed. Partition logs live in `DATA/topics/NAME/P`.
//!
//! # Thread-safety
//! Lookups take a short read lock. Changes are serialised by the admin service; the blocking
//! parts (metadata append, opening logs, deleting directories) run off the reactor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use conveyor_proto::internal::v1::{MetadataRecord, TopicConfigChanged, TopicCreated, TopicDeleted, metadata_record};
use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record};
use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
use prost::Message;

use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;
use crate::partition::{OpenContext, Partition};
use crate::topic_config::TopicDefaults;

const METADATA_DIR: &str = "__cluster_metadata";
const TOPICS_DIR: &str = "topics";
const TRASH_DIR: &str = "trash";
const MAX_TOPIC_NAME: usize = 249;

/// A topic as the metadata log describes it: how it was created and its current overrides.
type Replayed = (TopicCreated, BTreeMap<String, String>);

#[derive(Debug)]
pub struct Topic {
    pub name: String,
    pub id: String,
    pub replication_factor: i32,
    /// Explicit overrides; `effective` applies them to the broker defaults.
    pub overrides: BTreeMap<String, String>,
    pub effective: TopicDefaults,
    pub partitions: Vec<Arc<Partition>>,
}

impl Topic {
    pub fn partition(&self, index: i32) -> Result<&Arc<Partition>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.name.clone(),
                partition: index,
                count: self.partitions.len() as u32,
            })
    }
}

/// What the registry needs to open partitions.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub defaults: TopicDefaults,
    pub queue_depth: usize,
    pub max_partitions: u32,
}

#[derive(Debug)]
pub struct Registry {
    options: RegistryOptions,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    metadata: PartitionLog,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
}

/// Checks a topic name against Kafka's rules; `__` names are reserved for internal topics.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let fail = |reason: &str| {
        Err(BrokerError::InvalidTopicName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_TOPIC_NAME {
        return fail("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return fail("'.' and '..' are not allowed");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return fail("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with("__") {
        return fail("names starting with '__' are reserved for internal topics");
    }
    Ok(())
}

fn metadata_config() -> LogConfig {
    LogConfig {
        flush: FlushPolicy::Always,
        retention_ms: None,
        segment_bytes: 64 << 20,
        ..LogConfig::default()
    }
}

impl Registry {
    /// Opens the metadata log, replays it and opens every topic's partitions. Blocking.
    pub fn open(
        options: RegistryOptions,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Registry> {
        let meta_dir = options.data_dir.join(METADATA_DIR).join("0");
        let metadata = PartitionLog::open(&meta_dir, metadata_config())?;
        let registry = Registry {
            options,
            metrics,
            runtime,
            metadata,
            topics: RwLock::new(BTreeMap::new()),
        };
        let created = registry.replay()?;
        registry.remove_unknown_dirs(&created)?;
        for (created, overrides) in created.into_values() {
            let topic = registry.open_topic(&created, overrides)?;
            registry.insert(topic);
        }
        Ok(registry)
    }

    fn replay(&self) -> anyhow::Result<BTreeMap<String, Replayed>> {
        let mut topics = BTreeMap::new();
        let mut next = self.metadata.log_start_offset();
        while next < self.metadata.log_end_offset() {
            for batch in BatchIter::new(self.metadata.read(next, 1 << 20)?) {
                let batch = batch?;
                next = batch.header().next_offset();
                for record in batch.records()? {
                    let value = record?.value.unwrap_or_default();
                    match MetadataRecord::decode(value)?.change {
                        Some(metadata_record::Change::TopicCreated(t)) => {
                            let overrides: BTreeMap<String, String> = t.configs.clone().into_iter().collect();
                            topics.insert(t.name.clone(), (t, overrides));
                        }
                        Some(metadata_record::Change::TopicDeleted(t)) => {
                            topics.remove(&t.name);
                        }
                        Some(metadata_record::Change::TopicConfigChanged(c)) => {
                            if let Some(entry) = topics.get_mut(&c.name) {
                                entry.1 = c.configs.into_iter().collect();
                            }
                        }
                        None => {}
                    }
                }
            }
        }
        Ok(topics)
    }

    fn topics_dir(&self) -> PathBuf {
        self.options.data_dir.join(TOPICS_DIR)
    }

    fn remove_unknown_dirs<T>(&self, known: &BTreeMap<String, T>) -> anyhow::Result<()> {
        let trash = self.options.data_dir.join(TRASH_DIR);
        if trash.exists() {
            std::fs::remove_dir_all(&trash)?;
        }
        let dir = self.topics_dir();
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains_key(&name) {
                tracing::warn!(topic = %name, "removing data of a topic the metadata log does not know");
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }

    fn open_topic(&self, created: &TopicCreated, overrides: BTreeMap<String, String>) -> Result<Topic> {
        let effective = self
            .options
            .defaults
            .with_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        let ctx = OpenContext {
            node_id: u64::from(self.options.node_id),
            queue_depth: self.options.queue_depth,
            metrics: Arc::clone(&self.metrics),
            runtime: self.runtime.clone(),
        };
        let mut partitions: Vec<Arc<Partition>> = Vec::with_capacity(created.partitions as usize);
        for p in 0..created.partitions {
            let dir = self.topics_dir().join(&created.name).join(p.to_string());
            match Partition::open(&ctx, &created.name, p, &dir, effective.log_config()) {
                Ok(partition) => partitions.push(partition),
                Err(e) => {
                    // Leave no owner running for a topic that failed to open: a retry would
                    // otherwise put two writers on one directory.
                    for opened in &partitions {
                        self.runtime.block_on(opened.stop());
                    }
                    return Err(e);
                }
            }
        }
        Ok(Topic {
            name: created.name.clone(),
            id: created.topic_id.clone(),
            replication_factor: created.replication_factor.max(1),
            overrides,
            effective,
            partitions,
        })
    }

    fn insert(&self, topic: Topic) {
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.name.clone(), Arc::new(topic));
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.list().iter().flat_map(|t| t.partitions.iter().cloned()).collect()
    }

    pub fn defaults(&self) -> &TopicDefaults {
        &self.options.defaults
    }

    fn append_metadata(&self, change: metadata_record::Change) -> Result<()> {
        let value = MetadataRecord { change: Some(change) }.encode_to_vec();
        let mut builder = BatchBuilder::new(Compression::None);
        builder.push(&Record {
            timestamp: conveyor_storage::unix_millis(),
            key: None,
            value: Some(Bytes::from(value)),
            headers: vec![],
        });
        let batch = builder
            .build()
            .map_err(|e| BrokerError::Internal(format!("metadata record: {e}")))?;
        self.metadata
            .append(&batch)
            .map_err(|e| BrokerError::from_log(METADATA_DIR, 0, e))?;
        Ok(())
    }

    /// Validates, records and opens a new topic. Blocking; the caller serialises changes.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        let max = self.options.max_partitions;
        if partitions <= 0 || partitions as u32 > max {
            return Err(BrokerError::InvalidPartitions(partitions, max));
        }
        if !(0..=1).contains(&replication_factor) {
            return Err(BrokerError::InvalidReplication(replication_factor, 1));
        }
        self.options
            .defaults
            .with_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        if self.get(name).is_ok() {
            return Err(BrokerError::TopicExists(name.to_string()));
        }
        let created = TopicCreated {
            name: name.to_string(),
            partitions,
            replication_factor: 1,
            configs: overrides.clone().into_iter().collect(),
            topic_id: new_topic_id(),
        };
        self.append_metadata(metadata_record::Change::TopicCreated(created.clone()))?;
        let topic = self.open_topic(&created, overrides)?;
        self.insert(topic);
        self.get(name)
    }

    /// Records the deletion and forgets the topic; the caller stops its partitions and then
    /// calls [`remove_topic_data`](Self::remove_topic_data). Blocking.
    pub fn delete_topic(&self, name: &str) -> Result<Arc<Topic>> {
        let topic = self.get(name)?;
        self.append_metadata(metadata_record::Change::TopicDeleted(TopicDeleted {
            name: name.to_string(),
            topic_id: topic.id.clone(),
        }))?;
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        Ok(topic)
    }

    /// Moves a deleted topic's directory to the trash and removes it. Blocking.
    pub fn remove_topic_data(&self, topic: &Topic) -> Result<()> {
        let trash = self.options.data_dir.join(TRASH_DIR);
        let io = |e: std::io::Error| BrokerError::Internal(format!("removing data of topic '{}': {e}", topic.name));
        std::fs::create_dir_all(&trash).map_err(io)?;
        let target = trash.join(format!("{}-{}", topic.name, topic.id));
        let source = self.topics_dir().join(&topic.name);
        if source.exists() {
            std::fs::rename(&source, &target).map_err(io)?;
            std::fs::remove_dir_all(&target).map_err(io)?;
        }
        Ok(())
    }

    /// Applies config changes (an empty value resets a key). Blocking.
    pub fn alter_topic_config(&self, name: &str, changes: BTreeMap<String, String>) -> Result<Arc<Topic>> {
        let topic = self.get(name)?;
        let mut overrides = topic.overrides.clone();
        for (k, v) in changes {
            if v.is_empty() {
                overrides.remove(&k);
            } else {
                overrides.insert(k, v);
            }
        }
        let effective = self
            .options
            .defaults
            .with_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        self.append_metadata(metadata_record::Change::TopicConfigChanged(TopicConfigChanged {
            name: name.to_string(),
            configs: overrides.clone().into_iter().collect(),
        }))?;
        for p in &topic.partitions {
            p.log
                .set_config(effective.log_config())
                .map_err(|e| BrokerError::from_log(name, p.index, e))?;
        }
        self.insert(Topic {
            name: topic.name.clone(),
            id: topic.id.clone(),
            replication_factor: topic.replication_factor,
            overrides,
            effective,
            partitions: topic.partitions.clone(),
        });
        self.get(name)
    }

    /// Closes the metadata log cleanly. Partition logs are closed after their owners stop.
    pub fn close_metadata(&self) -> Result<()> {
        self.metadata
            .close()
            .map_err(|e| BrokerError::from_log(METADATA_DIR, 0, e))
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }
}

fn new_topic_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 96))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        for ok in ["orders", "a.b_c-d", "X9", &"x".repeat(249)] {
            validate_topic_name(ok).expect(ok);
        }
        for bad in ["", ".", "..", "has space", "emoji🚀", "__internal", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
    }
}
