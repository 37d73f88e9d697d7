//! Batches for unit tests.

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Record};

/// One record of `value` zero bytes, in a batch compressed with `compression`: a batch any
/// open log accepts, or, compressed, one that declares `value` bytes to inflate.
pub fn batch_of(compression: Compression, value: usize) -> Bytes {
    let mut b = BatchBuilder::new(compression);
    b.push(&Record {
        timestamp: 1,
        value: Some(Bytes::from(vec![0u8; value])),
        ..Record::default()
    });
    b.build().expect("batch")
}
