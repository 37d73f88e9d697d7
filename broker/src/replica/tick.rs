//! When a partition's Raft node ticks: by the clock, whatever woke its owner.
//!
//! Raft's logical clock drives elections, check-quorum (a leader cut off from a majority steps
//! down), leader-transfer timeouts and the preferred-leader check. The owner task wakes for
//! many reasons (peer messages, appends, control commands, the tick deadline); if ticks were
//! taken only when the timer won the wake-up race, a steady stream of other work could starve
//! them, and an isolated leader under load might never step down. [`TickSchedule`] is asked
//! on every owner round how many tick periods have passed, so ticks follow time by
//! construction.
//!
//! # Invariants
//! - Over any stretch of rounds, the ticks handed out never exceed the whole periods elapsed.
//! - One round gets at most `max_per_round` ticks. After a stall longer than that (a slow
//!   fsync, a paused process) the missed ticks are dropped rather than replayed in a burst:
//!   a burst of ticks with no messages stepped in between could make a leader miss its
//!   followers' answers and step down, or a follower campaign against a live leader.

use std::time::Duration;

use tokio::time::Instant;

/// The tick deadlines of one Raft node.
#[derive(Debug, Clone)]
pub struct TickSchedule {
    period: Duration,
    max_per_round: u32,
    next: Instant,
}

impl TickSchedule {
    /// The first tick falls due one `period` after `now`. `max_per_round` is at least 1.
    pub fn new(period: Duration, max_per_round: u32, now: Instant) -> TickSchedule {
        TickSchedule {
            period,
            max_per_round: max_per_round.max(1),
            next: now + period,
        }
    }

    /// When the next tick falls due: the owner also wakes for it when nothing else arrives.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// The ticks due at `now`: one per whole period elapsed since the last tick handed out,
    /// at most `max_per_round`. Called once per owner round, whatever woke it.
    pub fn due(&mut self, now: Instant) -> u32 {
        if now < self.next {
            return 0;
        }
        let behind = now.duration_since(self.next).as_nanos() / self.period.as_nanos().max(1);
        let elapsed = u32::try_from(behind).unwrap_or(u32::MAX).saturating_add(1);
        if elapsed > self.max_per_round {
            // Dropped ticks are not owed: the schedule restarts from now.
            self.next = now + self.period;
            self.max_per_round
        } else {
            self.next += self.period * elapsed;
            elapsed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(50);
    const MAX_PER_ROUND: u32 = 5;

    #[test]
    fn wakeups_that_are_never_the_timer_still_yield_one_tick_per_elapsed_period() {
        // The owner is woken every 10 ms by messages and appends for 2 s, and never by the
        // timer itself: time must still tick, 40 periods' worth.
        let start = Instant::now();
        let mut schedule = TickSchedule::new(PERIOD, MAX_PER_ROUND, start);
        let mut ticks = 0;
        for round in 1..=200 {
            ticks += schedule.due(start + Duration::from_millis(10 * round));
        }
        assert_eq!(ticks, 40, "2 s of busy rounds at a 50 ms tick");
    }

    #[test]
    fn a_round_before_the_deadline_gets_no_tick() {
        let start = Instant::now();
        let mut schedule = TickSchedule::new(PERIOD, MAX_PER_ROUND, start);
        assert_eq!(schedule.due(start), 0);
        assert_eq!(schedule.due(start + PERIOD - Duration::from_millis(1)), 0);
        assert_eq!(schedule.due(start + PERIOD), 1);
        assert_eq!(schedule.deadline(), start + PERIOD * 2);
    }

    #[test]
    fn slow_rounds_get_every_elapsed_tick_up_to_the_cap() {
        let start = Instant::now();
        let mut schedule = TickSchedule::new(PERIOD, MAX_PER_ROUND, start);
        // A 160 ms round (a slow fsync) owes 3 ticks; the remainder carries over.
        assert_eq!(schedule.due(start + Duration::from_millis(160)), 3);
        assert_eq!(schedule.due(start + Duration::from_millis(200)), 1);
    }

    #[test]
    fn a_long_stall_gives_at_most_the_cap_and_no_burst_after() {
        let start = Instant::now();
        let mut schedule = TickSchedule::new(PERIOD, MAX_PER_ROUND, start);
        let resumed = start + Duration::from_secs(10);
        assert_eq!(schedule.due(resumed), MAX_PER_ROUND);
        assert_eq!(
            schedule.due(resumed + Duration::from_millis(1)),
            0,
            "missed ticks are not replayed"
        );
        assert_eq!(schedule.due(resumed + PERIOD), 1);
    }

    /// How long the flooded loop below runs: several tick periods.
    const FLOOD: Duration = Duration::from_millis(300);

    /// The owner's round, as its loop runs it: a biased select in which work that is always
    /// ready comes first and the tick deadline last, then the schedule asked for due ticks.
    /// However slow the machine, the loop runs until at least one period has passed, so at
    /// least one tick is due.
    #[tokio::test]
    async fn an_owner_loop_flooded_with_messages_keeps_ticking() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(64);
        let start = Instant::now();
        let mut schedule = TickSchedule::new(PERIOD, MAX_PER_ROUND, start);
        let mut ticks = 0;
        let mut rounds = 0u64;
        while start.elapsed() < FLOOD {
            // Never empty: the flood the biased select always picks first.
            while tx.try_send(1).is_ok() {}
            tokio::select! {
                biased;
                Some(_) = rx.recv() => rounds += 1,
                () = tokio::time::sleep_until(schedule.deadline()) => {}
            }
            ticks += schedule.due(Instant::now());
        }
        assert!(rounds > 0, "the flood woke the loop");
        assert!(ticks >= 1, "no tick in {FLOOD:?} of steady load ({rounds} rounds)");
    }
}
