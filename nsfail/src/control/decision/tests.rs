//! The decision state machine's rules, one scenario a test.

use super::*;

const HOLD: Duration = Duration::from_secs(10);

/// A fake clock: an origin and an offset.
struct Clock(Instant, Duration);
impl Clock {
    fn new() -> Self {
        Self(Instant::now(), Duration::ZERO)
    }
    fn now(&self) -> Instant {
        self.0 + self.1
    }
    fn advance(&mut self, d: Duration) -> Instant {
        self.1 += d;
        self.now()
    }
}

fn setup(failback: Failback) -> (Decider, Clock) {
    let clock = Clock::new();
    let mut d = Decider::new();
    for e in ["a", "b", "c"] {
        d.add_encoder(e, clock.now());
    }
    let policy = ChannelPolicy {
        encoders: vec!["a".into(), "b".into(), "c".into()],
        failback,
        hold_down: HOLD,
    };
    d.set_channel("cam1", policy.clone(), "a");
    d.set_channel(
        "cam2",
        ChannelPolicy {
            encoders: vec!["b".into(), "a".into()],
            ..policy
        },
        "b",
    );
    (d, clock)
}

fn moved(ds: &[Decision]) -> Vec<(&str, &str, Option<&str>, Reason)> {
    ds.iter()
        .map(|d| {
            (
                d.channel.as_str(),
                d.from.as_str(),
                d.to.as_deref(),
                d.reason,
            )
        })
        .collect()
}

#[test]
fn failover_picks_the_best_healthy_backup_by_priority() {
    let (mut d, mut c) = setup(Failback::Manual);
    let t = c.advance(Duration::from_secs(1));
    assert_eq!(
        moved(&d.set_health("a", false, t)),
        vec![("cam1", "a", Some("b"), Reason::EncoderDown)]
    );
    // b is now active for both; b fails: cam1 goes to c (a is down), cam2 to a? a is down
    // too, so cam2 has no backup.
    let t = c.advance(Duration::from_secs(1));
    assert_eq!(
        moved(&d.set_health("b", false, t)),
        vec![
            ("cam1", "b", Some("c"), Reason::EncoderDown),
            ("cam2", "b", None, Reason::NoBackup),
        ]
    );
    assert_eq!(d.active("cam2"), Some("b"), "no backup: the mapping stays");
    // Repeated bad news for the same outage raises nothing new.
    assert!(d.set_health("b", false, t).is_empty());
}

#[test]
fn a_drained_backup_is_skipped_and_a_healthy_return_rescues_a_stranded_channel() {
    let (mut d, mut c) = setup(Failback::Manual);
    d.restore_drained("b");
    let t = c.advance(Duration::from_secs(1));
    assert_eq!(
        moved(&d.set_health("a", false, t)),
        vec![("cam1", "a", Some("c"), Reason::EncoderDown)]
    );
    let t = c.advance(Duration::from_secs(1));
    let ds = d.set_health("c", false, t);
    assert_eq!(moved(&ds), vec![("cam1", "c", None, Reason::NoBackup)]);
    let t = c.advance(Duration::from_secs(1));
    assert_eq!(
        moved(&d.set_health("a", true, t)),
        vec![("cam1", "c", Some("a"), Reason::Recovered)]
    );
}

#[test]
fn manual_failback_stays_on_the_backup() {
    let (mut d, mut c) = setup(Failback::Manual);
    d.set_health("a", false, c.advance(Duration::from_secs(1)));
    d.set_health("a", true, c.advance(Duration::from_secs(1)));
    assert!(d.tick(c.advance(HOLD * 3)).is_empty());
    assert_eq!(d.active("cam1"), Some("b"));
}

#[test]
fn auto_failback_waits_for_the_hold_down_then_returns_once() {
    let (mut d, mut c) = setup(Failback::Auto);
    d.set_health("a", false, c.advance(Duration::from_secs(1)));
    d.set_health("a", true, c.advance(Duration::from_secs(1)));
    assert!(
        d.tick(c.advance(HOLD - Duration::from_millis(1)))
            .is_empty()
    );
    let ds = d.tick(c.advance(Duration::from_millis(1)));
    assert_eq!(moved(&ds), vec![("cam1", "b", Some("a"), Reason::Failback)]);
    assert!(d.tick(c.advance(HOLD * 5)).is_empty(), "once");
}

#[test]
fn a_flapping_encoder_moves_a_channel_at_most_once_per_hold_down() {
    let (mut d, mut c) = setup(Failback::Auto);
    let mut moves = 0;
    // 'a' flaps every 300 ms for a minute.
    for i in 0..200 {
        let t = c.advance(Duration::from_millis(300));
        moves += d
            .set_health("a", i % 2 == 1, t)
            .iter()
            .chain(d.tick(t).iter())
            .filter(|x| x.channel == "cam1" && x.to.is_some())
            .count();
    }
    assert_eq!(moves, 1, "one failover, no failback while it flaps");
    // Once stable for the hold-down, it gets the channel back, once.
    let t = c.now();
    let healthy_now = d.healthy("a");
    if !healthy_now {
        d.set_health("a", true, t);
    }
    let ds = d.tick(c.advance(HOLD));
    assert_eq!(moved(&ds), vec![("cam1", "b", Some("a"), Reason::Failback)]);
}

#[test]
fn manual_remap_wins_over_automatic_failback() {
    let (mut d, mut c) = setup(Failback::Auto);
    let ds = d
        .remap("cam1", "c", c.advance(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(ds.reason, Reason::Manual);
    assert!(
        d.tick(c.advance(HOLD * 3)).is_empty(),
        "left where the operator put it"
    );
    // An automatic failover still happens if the chosen encoder dies, and then failback
    // is automatic again.
    let ds = d.set_health("c", false, c.advance(Duration::from_secs(1)));
    assert_eq!(
        moved(&ds),
        vec![("cam1", "c", Some("a"), Reason::EncoderDown)]
    );
}

#[test]
fn a_channel_the_leader_placed_is_failed_over_here_without_etcd_but_not_failed_back() {
    let (mut d, mut c) = setup(Failback::Auto);
    let ds = d
        .follow("cam1", "b", c.advance(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(moved(&[ds]), vec![("cam1", "a", Some("b"), Reason::Leader)]);
    assert!(
        d.tick(c.advance(HOLD * 3)).is_empty(),
        "no failback to a on its own: the leader's choice stays"
    );
    let ds = d.set_health("b", false, c.advance(Duration::from_secs(1)));
    assert_eq!(
        moved(&ds),
        vec![
            ("cam1", "b", Some("a"), Reason::EncoderDown),
            ("cam2", "b", Some("a"), Reason::EncoderDown)
        ]
    );
}

#[test]
fn a_follower_moves_nothing_by_itself_and_catches_up_when_it_decides_again() {
    let (mut d, mut c) = setup(Failback::Auto);
    let t = c.advance(Duration::from_secs(1));
    assert!(d.set_following(true, t).is_empty());
    assert!(d.following());
    // a dies: the leader decides, this host only notes it.
    assert!(d.set_health("a", false, t).is_empty());
    assert!(!d.healthy("a"));
    assert_eq!(d.active("cam1"), Some("a"));
    // A drain that would strand a channel is refused here as on the leader (cam2 has only
    // b and the dead a)...
    assert_eq!(d.drain("b", t), Err("cam2".to_owned()));
    assert!(!d.drained("b"));
    // ...and one that would not is marked, not carried out.
    d.set_health("a", true, t);
    assert_eq!(d.drain("b", t), Ok(Vec::new()));
    assert!(d.drained("b"));
    assert_eq!(d.active("cam2"), Some("b"));
    assert!(d.set_health("a", false, t).is_empty());
    assert!(d.tick(c.advance(HOLD * 3)).is_empty());
    // Following again changes nothing; deciding again moves what this host's view says
    // must move, at once: cam1 off the dead a (b is drained: to c). cam2, on the drained
    // but working b with a dead backup, stays, and is no outage.
    let t = c.advance(Duration::from_secs(1));
    assert!(d.set_following(true, t).is_empty());
    assert_eq!(
        moved(&d.set_following(false, t)),
        vec![("cam1", "a", Some("c"), Reason::EncoderDown)]
    );
    assert_eq!(d.active("cam2"), Some("b"));
    assert!(d.set_following(false, t).is_empty(), "once");
}

#[test]
fn a_follower_fails_over_itself_what_its_leader_has_not_moved_within_the_grace() {
    let (mut d, mut c) = setup(Failback::Manual);
    let grace = Duration::from_millis(500);
    let t = c.now();
    assert!(
        d.overdue(t, Duration::ZERO).is_empty(),
        "a deciding host has nothing overdue"
    );
    d.set_following(true, t);
    assert!(d.set_health("b", false, t).is_empty());
    assert!(
        d.overdue(c.advance(grace - Duration::from_millis(1)), grace)
            .is_empty()
    );
    assert_eq!(
        moved(&d.overdue(c.advance(Duration::from_millis(1)), grace)),
        vec![("cam2", "b", Some("a"), Reason::EncoderDown)]
    );
    assert!(d.overdue(c.advance(grace), grace).is_empty(), "once");
    // With no backup, stranded, reported once.
    d.set_health("a", false, c.now());
    let t = c.advance(grace);
    assert_eq!(
        moved(&d.overdue(t, grace)),
        vec![
            ("cam1", "a", Some("c"), Reason::EncoderDown),
            ("cam2", "a", None, Reason::NoBackup)
        ]
    );
    assert!(d.overdue(c.advance(grace), grace).is_empty());
}

#[test]
fn a_channel_stranded_on_an_encoder_that_recovers_in_place_is_reported_at_its_next_outage() {
    let (mut d, mut c) = setup(Failback::Manual);
    d.set_health("a", false, c.advance(Duration::from_secs(1)));
    let ds = d.set_health("b", false, c.advance(Duration::from_secs(1)));
    assert!(moved(&ds).contains(&("cam2", "b", None, Reason::NoBackup)));
    // b comes back: cam2 never left it.
    assert!(
        d.set_health("b", true, c.advance(Duration::from_secs(1)))
            .iter()
            .all(|x| x.channel != "cam2")
    );
    let ds = d.set_health("b", false, c.advance(Duration::from_secs(1)));
    assert!(
        moved(&ds).contains(&("cam2", "b", None, Reason::NoBackup)),
        "the second outage is reported too: {ds:?}"
    );
}

#[test]
fn a_new_leader_fails_back_a_channel_its_predecessor_failed_over_automatically() {
    let (mut d, mut c) = setup(Failback::Auto);
    let t = c.advance(Duration::from_secs(1));
    d.set_following(true, t);
    // The leader moved cam1 to b (a died) and cam2 to a by hand; this host followed both.
    d.set_health("a", false, t);
    d.follow("cam1", "b", t);
    d.follow("cam2", "a", t);
    d.set_health("a", true, c.advance(Duration::from_secs(1)));
    // This host leads now, and takes over how each was placed.
    let t = c.advance(Duration::from_secs(1));
    assert!(d.set_following(false, t).is_empty());
    d.set_manual("cam1", false);
    d.set_manual("cam2", true);
    assert_eq!(
        moved(&d.tick(c.advance(HOLD))),
        vec![("cam1", "b", Some("a"), Reason::Failback)],
        "cam2 stays where it was put by hand"
    );
}

#[test]
fn drain_moves_everything_or_nothing() {
    let (mut d, mut c) = setup(Failback::Auto);
    let t = c.advance(Duration::from_secs(1));
    d.set_health("c", false, t);
    // Draining b moves cam2 to a.
    let ds = d.drain("b", t).unwrap();
    assert_eq!(moved(&ds), vec![("cam2", "b", Some("a"), Reason::Drain)]);
    // Draining a now would strand cam1 (b drained, c down): refused, nothing changes.
    assert_eq!(d.drain("a", t), Err("cam1".to_owned()));
    assert!(!d.drained("a"));
    assert_eq!(d.active("cam1"), Some("a"));
    // cam2 was placed by the drain, so failback leaves it alone (a drained encoder on an
    // automatic channel: `failback_never_chooses_a_drained_encoder`).
    assert!(d.tick(c.advance(HOLD * 2)).is_empty());
    assert!(d.undrain("b"));
}

/// Puts cam1 (auto failback, priority a, b, c) on c by automatic failover while `a` is
/// drained and long healthy: a drain moves it to b (a manual placement), then b dies and
/// it fails over to c, which makes it automatic again. Returns the time of that move.
fn on_c_by_failover_with_a_drained(d: &mut Decider, c: &mut Clock) -> Instant {
    let t = c.advance(HOLD * 2);
    assert_eq!(
        moved(&d.drain("a", t).unwrap()),
        vec![("cam1", "a", Some("b"), Reason::Drain)]
    );
    let t = c.advance(Duration::from_secs(1));
    let ds = d.set_health("b", false, t);
    assert_eq!(moved(&ds)[0], ("cam1", "b", Some("c"), Reason::EncoderDown));
    t
}

#[test]
fn failback_never_chooses_a_drained_encoder() {
    let (mut d, mut c) = setup(Failback::Auto);
    on_c_by_failover_with_a_drained(&mut d, &mut c);
    // a is healthy, stable, first in priority and the last move is a hold-down old: only
    // its drain keeps cam1 off it.
    for _ in 0..6 {
        assert!(
            d.tick(c.advance(HOLD / 2)).is_empty(),
            "failback to a drained encoder"
        );
    }
    assert_eq!(d.active("cam1"), Some("c"));
    assert!(d.undrain("a"));
    assert_eq!(
        moved(&d.tick(c.advance(Duration::from_millis(1)))),
        vec![("cam1", "c", Some("a"), Reason::Failback)]
    );
}

#[test]
fn failback_waits_a_hold_down_after_the_last_move() {
    let (mut d, mut c) = setup(Failback::Auto);
    let moved_at = on_c_by_failover_with_a_drained(&mut d, &mut c);
    // a has been healthy for more than a hold-down; only the move to c is recent.
    assert!(d.undrain("a"));
    let t = c.advance(HOLD - Duration::from_millis(1));
    assert_eq!(t, moved_at + HOLD - Duration::from_millis(1));
    assert!(
        d.tick(t).is_empty(),
        "failback sooner than a hold-down after the last move"
    );
    assert_eq!(
        moved(&d.tick(c.advance(Duration::from_millis(1)))),
        vec![("cam1", "c", Some("a"), Reason::Failback)]
    );
}

#[test]
fn unknown_encoders_and_repeated_states_decide_nothing() {
    let (mut d, c) = setup(Failback::Auto);
    assert!(d.set_health("zz", false, c.now()).is_empty());
    assert!(d.set_health("a", true, c.now()).is_empty());
    assert!(d.remap("nope", "a", c.now()).is_none());
}
