//! Producer ids from `Produce.InitProducer`: never the same id twice, whichever broker
//! issues it, across block roll-overs, a SIGKILLed controller and restarts (SIGTERM and
//! SIGKILL) of a broker.

use std::collections::BTreeSet;

use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_tests::cluster::Cluster;
use conveyor_tests::raw_produce::new_producer;
use conveyor_tests::{BrokerProcess, runtime};
use tonic::transport::Endpoint;

/// Calls per broker and round: more than a block (1000 ids), so blocks roll over.
const CALLS: usize = 1500;
/// Calls in flight at once on one broker: concurrent calls must not share an id or each
/// fetch a block.
const CONCURRENCY: usize = 32;

/// `count` ids from the broker at `address`, [`CONCURRENCY`] calls at a time.
async fn many_ids(address: String, count: usize) -> Vec<i64> {
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        // A channel of its own (reconnecting by itself) per caller: the calls run side by side.
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .expect("broker address")
            .connect_lazy();
        let mut client = ProduceClient::new(channel);
        let share = count / CONCURRENCY + usize::from(worker < count % CONCURRENCY);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(share);
            for _ in 0..share {
                ids.push(new_producer(&mut client).await);
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.extend(task.await.expect("caller task"));
    }
    ids
}

/// [`CALLS`] ids from each of `addresses` at once.
fn round(rt: &tokio::runtime::Runtime, addresses: &[String]) -> Vec<i64> {
    rt.block_on(async {
        let tasks: Vec<_> = addresses
            .iter()
            .map(|a| tokio::spawn(many_ids(a.clone(), CALLS)))
            .collect();
        let mut ids = Vec::new();
        for task in tasks {
            ids.extend(task.await.expect("broker round"));
        }
        ids
    })
}

/// Adds `ids` to `seen`, failing on a negative id or one issued before.
fn add_distinct(seen: &mut BTreeSet<i64>, ids: &[i64], when: &str) {
    for &id in ids {
        assert!(id >= 0, "{when}: negative producer id {id}");
        assert!(seen.insert(id), "{when}: producer id {id} issued twice");
    }
}

#[test]
fn given_a_cluster_when_producers_are_initialised_on_every_broker_across_controller_failover_should_never_share_an_id()
{
    let mut cluster = Cluster::start(3, &[]);
    let rt = runtime();
    let addresses = |cluster: &Cluster, skip: Option<u32>| -> Vec<String> {
        cluster
            .ids()
            .into_iter()
            .filter(|id| Some(*id) != skip)
            .map(|id| cluster.broker(id).addr().to_string())
            .collect()
    };
    let mut seen = BTreeSet::new();

    // Each round gets CALLS ids from every broker asked; `add_distinct` fails on a repeat.
    let ids = round(&rt, &addresses(&cluster, None));
    add_distinct(&mut seen, &ids, "before the failover");
    // Concurrent calls wait for the one fetch in flight instead of each fetching a block:
    // 1500 ids take two blocks of 1000.
    for id in cluster.ids() {
        let fetched = cluster.broker(id).log().matches("new block of producer ids").count();
        assert_eq!(fetched, 2, "blocks fetched by broker {id}");
    }

    let controller = cluster.wait_for_controller(None);
    cluster.broker_mut(controller).kill();
    cluster.wait_for_controller(Some(controller));
    let ids = round(&rt, &addresses(&cluster, Some(controller)));
    add_distinct(&mut seen, &ids, "after the controller was SIGKILLed");

    cluster.broker_mut(controller).restart();
    let ids = round(&rt, &addresses(&cluster, None));
    add_distinct(&mut seen, &ids, "after the old controller came back");
}

#[test]
fn given_a_single_broker_when_it_restarts_should_never_issue_an_id_it_issued_before() {
    // A metadata snapshot after every record: the next id must come from the snapshot,
    // as the log below it is deleted.
    let mut broker = BrokerProcess::start_with_config("[cluster]\nmetadata_snapshot_records = 1\n");
    let rt = runtime();
    let mut seen = BTreeSet::new();
    let addresses = [broker.addr().to_string()];

    add_distinct(&mut seen, &round(&rt, &addresses), "first start");
    broker.terminate();
    broker.restart();
    add_distinct(&mut seen, &round(&rt, &addresses), "after SIGTERM and restart");
    broker.kill();
    broker.restart();
    add_distinct(&mut seen, &round(&rt, &addresses), "after SIGKILL and restart");
    assert!(
        broker.log().contains("loaded the metadata snapshot"),
        "the restart read a snapshot:\n{}",
        broker.log()
    );
}
