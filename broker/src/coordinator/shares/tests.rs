//! Tests of share-partition windows: acquisition, acknowledgement, locks, key order,
//! delays, dead letters, and the records that rebuild them.
