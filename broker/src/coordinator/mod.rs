//! Coordinators: the consumer group coordinator, the share-group (queue) coordinator and
//! the transaction coordinator. Nothing lives here yet.
//!
//! Each will be a state machine replayed from an internal partition (as the controller's
//! metadata is replayed from its log, see [`crate::controller`]), led by that partition's
//! leader, snapshotted with [`crate::replica::state_snapshot`] so that a start or a follower
//! far behind loads a snapshot instead of replaying the whole partition, and served by its
//! own gRPC service in [`crate::api`].
