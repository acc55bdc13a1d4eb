//! The parent's view of its shards: in-process tasks or child processes.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::BenchError;
use crate::worker::{Counts, Job, WorkerEvent, WorkerResult, run_worker};

struct ChildShard {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Per-shard state as the parent knows it.
#[derive(Default)]
pub struct ShardState {
    pub counts: Counts,
    pub ready: Option<Vec<u64>>,
    pub done: Option<Box<WorkerResult>>,
    pub failed: Option<String>,
}

pub struct Fleet {
    rx: mpsc::UnboundedReceiver<WorkerEvent>,
    children: Vec<ChildShard>,
    local_stop: Option<watch::Sender<bool>>,
    pub shards: Vec<ShardState>,
}

/// How to start a child: the current executable with the arguments that came before
/// the scenario name (so `herald bench fanout …` re-executes as `herald bench worker`).
fn worker_command() -> Result<Command, BenchError> {
    let exe = std::env::current_exe()?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let prefix_len = args
        .iter()
        .position(|a| a == "connect" || a == "fanout")
        .unwrap_or(0);
    let mut cmd = Command::new(exe);
    cmd.args(&args[..prefix_len]).arg("worker");
    Ok(cmd)
}

impl Fleet {
    /// Starts one shard per job: in this process when there is a single job,
    /// otherwise one child process each.
    pub fn start(jobs: Vec<Job>) -> Result<Fleet, BenchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut fleet = Fleet {
            rx,
            children: Vec::new(),
            local_stop: None,
            shards: jobs.iter().map(|_| ShardState::default()).collect(),
        };
        if jobs.len() == 1 {
            let (stop_tx, stop_rx) = watch::channel(false);
            fleet.local_stop = Some(stop_tx);
            for job in jobs {
                let (tx, stop_rx) = (tx.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    let shard = job.shard;
                    let ev = match run_worker(job, tx.clone(), stop_rx).await {
                        Ok(r) => WorkerEvent::Done {
                            shard,
                            result: Box::new(r),
                        },
                        Err(e) => WorkerEvent::Failed {
                            shard,
                            message: e.to_string(),
                        },
                    };
                    let _ = tx.send(ev);
                });
            }
            return Ok(fleet);
        }
        for job in jobs {
            let mut child = worker_command()?
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let mut stdin = child.stdin.take();
            let stdout = child.stdout.take();
            let line = serde_json::to_string(&job)?;
            if let Some(s) = stdin.as_mut() {
                s.write_all(line.as_bytes())?;
                s.write_all(b"\n")?;
                s.flush()?;
            }
            let (tx, shard) = (tx.clone(), job.shard);
            std::thread::spawn(move || {
                let mut finished = false;
                if let Some(out) = stdout {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        match serde_json::from_str::<WorkerEvent>(&line) {
                            Ok(ev) => {
                                finished |= matches!(
                                    ev,
                                    WorkerEvent::Done { .. } | WorkerEvent::Failed { .. }
                                );
                                if tx.send(ev).is_err() {
                                    return;
                                }
                            }
                            Err(_) => eprintln!("herald-bench worker {shard}: {line}"),
                        }
                    }
                }
                if !finished {
                    let _ = tx.send(WorkerEvent::Failed {
                        shard,
                        message: "worker process exited without a result".into(),
                    });
                }
            });
            fleet.children.push(ChildShard { child, stdin });
        }
        Ok(fleet)
    }

    /// Next event before `until`, applied to `shards`; `None` on timeout.
    pub async fn recv(&mut self, until: Instant) -> Option<WorkerEvent> {
        let ev = tokio::time::timeout_at(until, self.rx.recv())
            .await
            .ok()??;
        let idx = match &ev {
            WorkerEvent::Progress { shard, .. }
            | WorkerEvent::Ready { shard, .. }
            | WorkerEvent::Done { shard, .. }
            | WorkerEvent::Failed { shard, .. } => *shard as usize,
        };
        if let Some(s) = self.shards.get_mut(idx) {
            match &ev {
                WorkerEvent::Progress { counts, .. } => s.counts = *counts,
                WorkerEvent::Ready {
                    counts,
                    subs_per_channel,
                    ..
                } => {
                    s.counts = *counts;
                    s.ready = Some(subs_per_channel.clone());
                }
                WorkerEvent::Done { result, .. } => {
                    s.counts = result.counts;
                    s.done = Some(result.clone());
                }
                WorkerEvent::Failed { message, .. } => s.failed = Some(message.clone()),
            }
        }
        Some(ev)
    }

    /// Processes events until `pred` holds or `until` passes; true if `pred` held.
    pub async fn wait_until(
        &mut self,
        until: Instant,
        mut tick: impl FnMut(&Fleet),
        pred: impl Fn(&Fleet) -> bool,
    ) -> bool {
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            let step = (Instant::now() + Duration::from_millis(250)).min(until);
            let _ = self.recv(step).await;
            tick(self);
        }
    }

    pub fn totals(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.shards {
            c.add(&s.counts);
        }
        c
    }

    pub fn all_ready(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.ready.is_some() || s.done.is_some() || s.failed.is_some())
    }

    pub fn all_done(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.done.is_some() || s.failed.is_some())
    }

    pub fn stop(&mut self) {
        if let Some(tx) = &self.local_stop {
            let _ = tx.send(true);
        }
        for c in &mut self.children {
            if let Some(mut s) = c.stdin.take() {
                let _ = s.write_all(b"stop\n");
                let _ = s.flush();
            }
        }
    }

    /// Waits for every shard's result (bounded), then reaps or kills the children.
    pub async fn finish(mut self, grace: Duration) -> Vec<ShardState> {
        self.stop();
        let until = Instant::now() + grace;
        self.wait_until(until, |_| {}, Fleet::all_done).await;
        for c in &mut self.children {
            let reaped = matches!(c.child.try_wait(), Ok(Some(_)));
            if !reaped {
                // Results are in (or never will be); give the child a moment to exit.
                let t = Instant::now() + Duration::from_secs(2);
                while Instant::now() < t && matches!(c.child.try_wait(), Ok(None)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if matches!(c.child.try_wait(), Ok(None)) {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                }
            }
        }
        self.children.clear();
        std::mem::take(&mut self.shards)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.child.try_wait(), Ok(None)) {
                let _ = c.child.kill();
                let _ = c.child.wait();
            }
        }
    }
}
