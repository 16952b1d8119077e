//! The checkpoint protocol on its own: every case drives [`Protocol`] by hand and checks the
//! actions it asks for.

use super::*;

const SRC: usize = 0;
const WIN: usize = 1;
const LAKE: usize = 2;

fn node(name: &str, role: Role) -> NodeInfo {
    NodeInfo { name: name.into(), role, fingerprint: name.len() as u64 }
}

/// source -> window -> sink, no epochs before.
fn linear() -> Protocol {
    Protocol::new(vec![node("src", Role::Source), node("win", Role::Transform), node("lake", Role::Sink)], 0)
}

fn sends(actions: &[Action]) -> Vec<(usize, Control)> {
    actions.iter().filter_map(|a| if let Action::Send(n, c) = a { Some((*n, *c)) } else { None }).collect()
}

fn write_of(actions: &[Action]) -> Option<&Checkpoint> {
    actions.iter().find_map(|a| if let Action::Write(ck) = a { Some(ck) } else { None })
}

fn durable_of(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| if let Action::Durable { epoch, .. } = a { Some(*epoch) } else { None })
}

fn snap(node: usize, epoch: u64, state: &[u8]) -> Report {
    Report::Snapshot { node, epoch, state: state.to_vec(), partitions: Vec::new() }
}

fn finished(node: usize, state: &[u8]) -> Report {
    Report::Finished { node, state: state.to_vec(), partitions: Vec::new() }
}

/// Every component of `linear()` reports for `epoch`; returns the actions of the last report.
fn all_report(p: &mut Protocol, epoch: u64) -> Vec<Action> {
    assert!(p.report(snap(SRC, epoch, b"pos")).is_empty());
    assert!(p.report(snap(WIN, epoch, b"state")).is_empty());
    p.report(snap(LAKE, epoch, b"staged"))
}

#[test]
fn a_tick_issues_a_barrier_to_live_sources_only() {
    let mut p = linear();
    assert!(p.idle());
    let a = p.tick();
    assert_eq!(sends(&a), vec![(SRC, Control::Barrier(1))]);
    assert!(!p.idle(), "a checkpoint is running");
    assert!(p.tick().is_empty(), "a tick during a checkpoint starts nothing");
    assert_eq!(p.epochs(), 1);
}

#[test]
fn an_epoch_is_written_once_every_component_reported_then_committed_in_order() {
    let mut p = linear();
    p.tick();
    let a = all_report(&mut p, 1);
    let ck = write_of(&a).expect("written when nothing is awaited");
    assert_eq!(ck.epoch, 1);
    assert_eq!(ck.components["src"], ComponentState { fingerprint: 3, state: b"pos".to_vec() });
    assert_eq!(ck.components["lake"].state, b"staged");
    assert!(sends(&a).is_empty(), "nothing is committed before the checkpoint is durable");
    let a = p.written(1, Ok(()));
    assert_eq!(durable_of(&a), Some(1));
    assert_eq!(sends(&a), vec![(LAKE, Control::Commit(1))], "sinks commit first, sources wait for them");
    let a = p.report(Report::Committed { node: LAKE, epoch: 1 });
    assert_eq!(sends(&a), vec![(SRC, Control::Commit(1))]);
    assert!(p.idle() && !p.is_finished());
}

#[test]
fn sources_commit_only_once_every_sink_committed() {
    let nodes = vec![node("src", Role::Source), node("a", Role::Sink), node("b", Role::Sink)];
    let mut p = Protocol::new(nodes, 0);
    p.tick();
    p.report(snap(0, 1, b""));
    p.report(snap(1, 1, b""));
    let a = p.report(snap(2, 1, b""));
    assert!(write_of(&a).is_some());
    let a = p.written(1, Ok(()));
    assert_eq!(sends(&a), vec![(1, Control::Commit(1)), (2, Control::Commit(1))]);
    assert!(sends(&p.report(Report::Committed { node: 2, epoch: 1 })).is_empty(), "sink a has not committed yet");
    assert_eq!(sends(&p.report(Report::Committed { node: 1, epoch: 1 })), vec![(0, Control::Commit(1))]);
}

#[test]
fn a_report_for_another_epoch_is_ignored() {
    let mut p = linear();
    p.tick();
    p.report(snap(SRC, 1, b""));
    p.report(snap(WIN, 1, b""));
    assert!(p.report(snap(LAKE, 0, b"old")).is_empty(), "a stale epoch completes nothing");
    let a = p.report(snap(LAKE, 1, b"new"));
    assert_eq!(write_of(&a).unwrap().components["lake"].state, b"new");
}

#[test]
fn a_failure_ends_the_run_and_later_reports_change_nothing() {
    let mut p = linear();
    p.tick();
    p.report(snap(SRC, 1, b""));
    let a = p.report(Report::Failed { node: WIN, error: "boom".into() });
    assert!(a.is_empty());
    assert!(p.is_finished());
    assert_eq!(p.failure(), Some("win: boom"));
    assert!(p.report(snap(WIN, 1, b"")).is_empty());
    assert!(p.report(snap(LAKE, 1, b"")).is_empty(), "no checkpoint is written after a failure");
    assert!(p.report(Report::RequestCheckpoint).is_empty());
    assert!(p.tick().is_empty() && p.stop().is_empty());
    assert_eq!(p.failure(), Some("win: boom"), "the first failure is the one reported");
}

#[test]
fn a_sink_commit_that_fails_fails_the_run_before_sources_commit() {
    let mut p = linear();
    p.tick();
    all_report(&mut p, 1);
    p.written(1, Ok(()));
    let a = p.report(Report::Failed { node: LAKE, error: "commit of epoch 1: disk full".into() });
    assert!(sends(&a).is_empty(), "sources never commit what a sink did not make visible");
    assert_eq!(p.failure(), Some("lake: commit of epoch 1: disk full"));
    assert!(p.is_finished());
}

#[test]
fn a_stop_during_a_checkpoint_finishes_it_then_runs_the_final_epoch() {
    let mut p = linear();
    p.tick();
    assert_eq!(sends(&p.stop()), vec![(SRC, Control::Stop)]);
    assert!(p.stop().is_empty(), "stop is asked once");
    assert!(p.tick().is_empty(), "no new epoch while stopping");
    // the source ends its stream before reaching the barrier: its final state stands for epoch 1
    p.report(finished(SRC, b"end"));
    p.report(snap(WIN, 1, b"w"));
    let a = p.report(snap(LAKE, 1, b"s"));
    assert_eq!(write_of(&a).unwrap().components["src"].state, b"end");
    let a = p.written(1, Ok(()));
    assert_eq!(sends(&a), vec![(LAKE, Control::Commit(1))]);
    p.report(Report::Committed { node: LAKE, epoch: 1 });
    // the window and the sink finish; then the final epoch flushes the sink
    assert!(p.report(finished(WIN, b"w-final")).is_empty());
    let a = p.report(Report::Drained { node: LAKE });
    assert_eq!(sends(&a), vec![(LAKE, Control::Flush(2))], "the final epoch starts once all are done");
    let a = p.report(snap(LAKE, 2, b"s2"));
    let ck = write_of(&a).unwrap();
    assert_eq!((ck.epoch, &ck.components["win"].state[..]), (2, &b"w-final"[..]));
    p.written(2, Ok(()));
    assert!(!p.is_finished(), "not before the sources committed the final epoch");
    let a = p.report(Report::Committed { node: LAKE, epoch: 2 });
    assert_eq!(sends(&a), vec![(SRC, Control::Commit(2))]);
    assert!(p.is_finished() && p.failure().is_none());
}

#[test]
fn the_final_epoch_after_end_of_input() {
    let mut p = linear();
    assert!(p.report(finished(SRC, b"eof")).is_empty());
    assert!(p.report(finished(WIN, b"")).is_empty());
    let a = p.report(Report::Drained { node: LAKE });
    assert_eq!(sends(&a), vec![(LAKE, Control::Flush(1))]);
    let a = p.report(snap(LAKE, 1, b"last"));
    let ck = write_of(&a).unwrap();
    assert_eq!(ck.components.len(), 3, "finished components contribute their final state");
    let a = p.written(1, Ok(()));
    assert_eq!(sends(&a), vec![(LAKE, Control::Commit(1))]);
    assert_eq!(sends(&p.report(Report::Committed { node: LAKE, epoch: 1 })), vec![(SRC, Control::Commit(1))]);
    assert!(p.is_finished());
    assert_eq!(p.epochs(), 1);
}

#[test]
fn a_sink_that_drains_during_a_checkpoint_is_told_to_flush_for_it() {
    let mut p = linear();
    p.tick();
    p.report(finished(SRC, b""));
    p.report(finished(WIN, b""));
    let a = p.report(Report::Drained { node: LAKE });
    assert_eq!(sends(&a), vec![(LAKE, Control::Flush(1))], "its barrier will never come");
}

#[test]
fn a_final_checkpoint_that_cannot_be_written_fails_the_run() {
    let mut p = linear();
    p.report(finished(SRC, b""));
    p.report(finished(WIN, b""));
    p.report(Report::Drained { node: LAKE });
    p.report(snap(LAKE, 1, b""));
    let a = p.written(1, Err("store unreachable".into()));
    assert!(sends(&a).is_empty(), "nothing is committed");
    assert!(p.is_finished());
    assert_eq!(p.failure(), Some("final checkpoint could not be written: store unreachable"));
}

#[test]
fn a_checkpoint_that_cannot_be_written_keeps_its_output_staged_and_the_run_goes_on() {
    let mut p = linear();
    p.tick();
    all_report(&mut p, 1);
    let a = p.written(1, Err("timeout".into()));
    assert!(a.is_empty(), "no commit, no durable epoch");
    assert!(!p.is_finished() && p.idle());
    assert_eq!(sends(&p.tick()), vec![(SRC, Control::Barrier(2))], "the next epoch covers it");
    let a = all_report(&mut p, 2);
    assert_eq!(write_of(&a).unwrap().epoch, 2);
    assert_eq!(sends(&p.written(2, Ok(()))), vec![(LAKE, Control::Commit(2))]);
}

#[test]
fn a_source_asking_for_a_checkpoint_while_one_runs_gets_no_second_one() {
    let mut p = linear();
    assert_eq!(sends(&p.report(Report::RequestCheckpoint)), vec![(SRC, Control::Barrier(1))]);
    assert!(p.report(Report::RequestCheckpoint).is_empty());
    let a = all_report(&mut p, 1);
    assert!(write_of(&a).is_some());
    assert!(p.report(Report::RequestCheckpoint).is_empty(), "nor while it is being written");
    p.written(1, Ok(()));
    assert_eq!(sends(&p.report(Report::RequestCheckpoint)), vec![(SRC, Control::Barrier(2))]);
}

#[test]
fn a_restored_run_continues_the_epochs_and_waits_for_new_commits() {
    // restored from checkpoint 7, whose staged files the sinks commit when they start
    let mut p = Protocol::new(vec![node("src", Role::Source), node("lake", Role::Sink)], 7);
    assert!(sends(&p.report(Report::Committed { node: 1, epoch: 7 })).is_empty(), "epoch 7 was committed before");
    assert_eq!(sends(&p.tick()), vec![(0, Control::Barrier(8))]);
    p.report(snap(0, 8, b""));
    let a = p.report(snap(1, 8, b""));
    assert_eq!(write_of(&a).unwrap().epoch, 8);
    p.written(8, Ok(()));
    assert_eq!(sends(&p.report(Report::Committed { node: 1, epoch: 8 })), vec![(0, Control::Commit(8))]);
    assert_eq!(p.epochs(), 1);
}

#[test]
fn partition_states_reach_the_durable_epoch() {
    let mut p = linear();
    p.tick();
    p.report(snap(SRC, 1, b""));
    let parts = vec![PartitionState { source: 0, partition: 3, state: b"p3".to_vec() }];
    p.report(Report::Snapshot { node: WIN, epoch: 1, state: b"".to_vec(), partitions: parts });
    p.report(snap(LAKE, 1, b""));
    let a = p.written(1, Ok(()));
    let partitions = a
        .iter()
        .find_map(|a| if let Action::Durable { partitions, .. } = a { Some(partitions) } else { None })
        .unwrap();
    assert_eq!(partitions[&(0, 3)]["win"], b"p3");
}

#[test]
fn without_sinks_sources_commit_when_the_checkpoint_is_durable() {
    let mut p = Protocol::new(vec![node("src", Role::Source), node("t", Role::Transform)], 0);
    p.tick();
    p.report(snap(0, 1, b""));
    let a = p.report(snap(1, 1, b""));
    assert!(write_of(&a).is_some());
    assert_eq!(sends(&p.written(1, Ok(()))), vec![(0, Control::Commit(1))]);
}

#[test]
fn ticks_start_nothing_once_every_source_finished() {
    let mut p = linear();
    p.report(finished(SRC, b""));
    assert!(p.tick().is_empty(), "the final epoch, not a timed one, covers the rest");
}
