//! The process driver: runs, supervises and stops the instances of one colour of one service.
//!
//! It owns the operating-system side of an instance: choosing a free loopback port, spawning the
//! service's `command` through `/bin/sh -c` in its own process group with output appended to a log
//! file, restarting it with exponential backoff when it exits, stopping the whole process group
//! (SIGTERM, then SIGKILL after a grace period), and taking over instances an earlier cutover
//! started ([`ProcessGroup::adopt`], [`stop_recorded`]). It never decides *when* instances run
//! (that is the lifecycle), never health-checks them (health.rs) and never touches the route table
//! or the store: the daemon reads [`ProcessGroup::instances`] / [`ProcessGroup::subscribe`] to
//! build routes and health checks, and persists [`Recorded`] so that a restarted daemon can adopt.
//!
//! # Process groups, and why the leader is reaped last
//! Each instance is the leader of its own process group (`process_group(0)`), so one `killpg`
//! reaches everything the command started (`sh -c 'worker & exec server'`), including children
//! whose parent already died. A process that leaves the group on purpose (`setsid`, classic
//! daemonizing) is out of reach; a service run by cutover must stay in the foreground.
//!
//! A group id is the leader's pid, and Linux does not hand a pid out again while it is still in use
//! as a process id *or* a group id. For our own children the driver therefore notices an exit with
//! `waitid(WNOWAIT)` and reaps the leader only after the rest of its group is gone: as long as the
//! zombie leader is unreaped, the group id cannot belong to anyone else, so every `killpg` the
//! driver sends hits the instance and nothing else. Adopted instances are not our children; their
//! group id stays reserved only while a member lives, so the driver checks for live members right
//! before each signal. "Alive" always means present in `/proc` and not a zombie: a zombie holds no
//! port and can receive no signal, and whoever is its parent will reap it (this driver reaps the
//! zombies that turn out to be its own children). The driver is Linux-only: it reads
//! `/proc/<pid>/stat`.
//!
//! # Adoption after a daemon restart
//! cutover's instances survive a `kill -9` of the daemon (they are in their own groups, and
//! nothing kills them). The daemon records each running instance as a [`Recorded`] (index, pid,
//! group, port and the process's start time in clock ticks since boot). On restart a record is
//! adopted when the pid is alive, still in that group and has the recorded start time (so a pid
//! that was reused by an unrelated process is never adopted, nor signalled). When the leader is
//! gone but members of its group live on, they are leftovers of that instance and are killed.
//! The port is not probed: an instance the old daemon had just started may not listen yet, and
//! the health checks decide whether it gets traffic.
//!
//! # Free ports
//! A port is chosen by binding `127.0.0.1:0` and closing the socket; the instance binds it
//! afterwards. In between, another program may take it (a narrow race). The driver never hands
//! one port to two of its own instances (a process-wide lease set), and when an exited instance
//! is restarted while its port is held by someone else, it moves to a new port and
//! [`InstanceInfo::port`] changes: subscribers must rebuild routes and health checks from it.
//!
//! # Crash loops
//! An exit within [`Backoff::reset_after`] of the process's start is a quick exit;
//! [`InstanceInfo::quick_exits`] counts them in a row (an exit after a longer run starts over at
//! 0), and [`InstanceInfo::crash_looping`] says when there were [`CRASH_LOOP_EXITS`] of them. The
//! driver restarts a crash-looping instance as any other (with backoff): whether that is worth
//! waiting for is the caller's decision (the daemon gives up on a release whose instance does
//! this before all of them were healthy). With each exit the driver keeps the last lines the
//! process wrote to its log ([`InstanceInfo::last_output`], bounded), so that the failure can be
//! shown where it is reported instead of only in `cutover logs`.
//!
//! # Shutdown
//! [`ProcessGroup::stop`] stops and waits; [`ProcessGroup::detach`] hands the running processes
//! over (as a crash would). Dropping a `ProcessGroup` without either stops its instances in the
//! background (the supervisors see the control channel close); if the runtime itself goes away
//! first, each instance's group is sent SIGKILL on the spot, so no instance outlives a daemon that
//! shuts down, only one that is killed.
//!
//! A supervisor that panics kills its process the same way (its `Proc` is dropped); a new
//! supervisor takes over the instance and starts it again after the backoff, as after an exit.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_proxy::Colour;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, Pid};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::MAX_INSTANCES;

/// Every command runs as `/bin/sh -c COMMAND`.
const SHELL: &str = "/bin/sh";

/// A sensible grace period between SIGTERM and SIGKILL when the caller has no opinion.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How often a supervisor checks whether its process is still alive. We poll instead of waiting
/// on SIGCHLD because adopted processes are not our children and cannot be waited for at all;
/// one `waitid` or one read of `/proc/<pid>/stat` per instance every 100 ms costs nothing.
const POLL: Duration = Duration::from_millis(100);

/// Quick exits in a row (each within [`Backoff::reset_after`] of its start) that make an instance
/// crash-looping: with the default backoff, three exits take under a second for a command that
/// fails at once, and a command that cannot start is not told apart from one that is slow to.
pub const CRASH_LOOP_EXITS: u32 = 3;

/// At most this many lines of a process's output are kept when it exits
/// ([`InstanceInfo::last_output`]).
pub const OUTPUT_TAIL_LINES: usize = 10;

/// Only the end of a log is read for [`InstanceInfo::last_output`], and each line is cut at
/// [`OUTPUT_LINE_CHARS`]: a process that writes megabytes before it dies costs one small read.
const OUTPUT_TAIL_BYTES: u64 = 8 * 1024;
const OUTPUT_LINE_CHARS: usize = 200;

/// How long a group may take to disappear after SIGKILL before its members are reported as
/// survivors (only a process stuck in the kernel takes this long).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What to run, and where: the instances of one colour of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The service's name; in errors, logs, the log path and `CUTOVER_SERVICE`.
    pub service: String,
    /// The colour these instances belong to; in the log path and `CUTOVER_COLOUR`.
    pub colour: Colour,
    /// The release being run; `CUTOVER_VERSION`.
    pub version: String,
    /// The command line, `{port}` not yet substituted; run with `/bin/sh -c`.
    pub command: String,
    /// How many copies, 1 to [`MAX_INSTANCES`].
    pub instances: u32,
    /// The working directory of the command: the config file's directory ([`crate::config::Config::dir`]).
    pub workdir: PathBuf,
    /// cutover's state directory; logs go to [`log_path`] below it.
    pub state_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
    /// Delays between restarts of an instance that keeps exiting.
    pub backoff: Backoff,
    /// How the instances reach the other services' instances of their own colour through
    /// cutover (`CUTOVER_PEER_URL`, `CUTOVER_PEER_TOKEN`); `None` gives them nothing.
    pub peers: Option<Peers>,
}

/// The way to the same colour of the other services: cutover's listener, and the token that,
/// with `X-Cutover-Colour`, selects a colour there.
#[derive(Clone, PartialEq, Eq)]
pub struct Peers {
    pub url: String,
    pub token: String,
}

impl fmt::Debug for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peers").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Exponential backoff between restarts: `initial`, doubling on each exit up to `max`. An
/// instance that stayed up at least `reset_after` before exiting starts over at `initial`: it
/// crashed once, it is not crash-looping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s, reset after 10 s up.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before the restart that follows `failures` earlier quick exits in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.min(31);
        self.initial.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }
}

/// Where instance `index` of `service`'s `colour` writes its stdout and stderr:
/// `<state_dir>/logs/<service>/<colour>-<index>.log`. Appended to across restarts and daemons.
pub fn log_path(state_dir: &Path, service: &str, colour: Colour, index: u32) -> PathBuf {
    state_dir
        .join("logs")
        .join(service)
        .join(format!("{colour}-{index}.log"))
}

/// What an instance is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// A process runs (it may not listen yet: that is for the health checks to find out).
    Running,
    /// The process exited; a new one starts after the backoff delay.
    Restarting,
    /// Being stopped: SIGTERM was sent.
    Stopping,
    /// Stopped on request; never restarted.
    Stopped,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Running => "running",
            InstanceState::Restarting => "restarting",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        })
    }
}

/// One instance as the daemon sees it: where to route, what to health-check, what to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// 0 to `instances - 1`; `CUTOVER_INSTANCE`.
    pub index: u32,
    /// Listens (or will) on `127.0.0.1:port`. Changes only if a restart finds it taken.
    pub port: u16,
    /// The process group leader (the `/bin/sh` or what it exec'd); `None` while restarting or
    /// stopped.
    pub pid: Option<u32>,
    /// Its process group; the same number as `pid` for instances cutover started.
    pub pgid: Option<u32>,
    /// The leader's start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the
    /// pid it identifies the process across pid reuse. `None` when unknown.
    pub start_time: Option<u64>,
    /// How many times this driver started a new process for this index after the first.
    pub restarts: u32,
    pub state: InstanceState,
    /// The process was started by an earlier cutover and taken over by this one.
    pub adopted: bool,
    /// How the last process ended ("exited with status 1", "killed by SIGKILL"), or why it could
    /// not be restarted. `None` while the first process runs.
    pub last_exit: Option<String>,
    /// The status the last process exited with, if it exited by itself and it is known (not when
    /// killed by a signal, nor for an adopted process, which is not our child).
    pub last_exit_code: Option<i32>,
    /// Exits in a row, each within [`Backoff::reset_after`] of its process's start; an exit after
    /// a longer run sets it back to 0. See [`InstanceInfo::crash_looping`].
    pub quick_exits: u32,
    /// The last lines (at most [`OUTPUT_TAIL_LINES`], each cut at 200 characters, control
    /// characters replaced) that the last process that exited wrote to its log, stdout and stderr
    /// together; cutover's own marker lines are left out. Empty until a process exited.
    pub last_output: Vec<String>,
    /// The log file ([`log_path`]), for `cutover logs`.
    pub log: PathBuf,
}

impl InstanceInfo {
    /// The address to route to and health-check.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Whether its processes keep exiting at once: [`CRASH_LOOP_EXITS`] quick exits in a row.
    pub fn crash_looping(&self) -> bool {
        self.quick_exits >= CRASH_LOOP_EXITS
    }

    /// What to persist so that a restarted daemon can adopt this instance; `None` without a
    /// process.
    pub fn recorded(&self) -> Option<Recorded> {
        Some(Recorded {
            index: self.index,
            pid: self.pid?,
            pgid: self.pgid?,
            port: self.port,
            start_time: self.start_time,
        })
    }
}

/// An instance as persisted by the daemon, to be adopted (or stopped) after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub index: u32,
    pub pid: u32,
    pub pgid: u32,
    pub port: u16,
    /// See [`InstanceInfo::start_time`]. Without it a reused pid in the same group cannot be told
    /// apart; record it.
    pub start_time: Option<u64>,
}

/// What [`ProcessGroup::adopt`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Indexes whose recorded process was alive and is now supervised here.
    pub adopted: Vec<u32>,
    /// Indexes started afresh: nothing was recorded, or the recorded process was gone (leftovers
    /// of its group were killed first).
    pub started: Vec<u32>,
    /// Recorded instances that still ran but are not wanted (an index beyond `instances`, or a
    /// second record for an index): stopped.
    pub stopped: Vec<Recorded>,
}

/// Why the driver could not do what it was asked. Each names the service and colour and says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("service {service} ({colour}): `instances` is {instances}; it must be 1 to {max}")]
    BadInstances {
        service: String,
        colour: Colour,
        instances: u32,
        max: u32,
    },
    #[error(
        "service {service} ({colour}): cannot run `{command}`: /bin/sh is missing; cutover runs \
         every command with `/bin/sh -c`, so a POSIX shell must be installed there"
    )]
    ShellMissing {
        service: String,
        colour: Colour,
        command: String,
    },
    #[error(
        "service {service} ({colour}): cannot run `{command}` in {}: {source}; commands run in the \
         directory of the config file, check that it still exists",
        dir.display()
    )]
    Workdir {
        service: String,
        colour: Colour,
        command: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(
        "service {service} ({colour}): cannot write the log file {}: {source}; make the state \
         directory writable by the user running cutover",
        path.display()
    )]
    Log {
        service: String,
        colour: Colour,
        path: PathBuf,
        source: io::Error,
    },
    #[error("service {service} ({colour}): cannot start instance {index} of `{command}`: {source}")]
    Spawn {
        service: String,
        colour: Colour,
        index: u32,
        command: String,
        source: io::Error,
    },
    #[error(
        "service {service} ({colour}): no free port on 127.0.0.1 for instance {index}: {source}; \
         free some ports or raise net.ipv4.ip_local_port_range"
    )]
    NoPort {
        service: String,
        colour: Colour,
        index: u32,
        source: io::Error,
    },
    #[error(
        "service {service} ({colour}): processes {pids:?} still run {}s after SIGKILL (stuck in the \
         kernel?); inspect them with `ps -o pid,stat,wchan,cmd -p PID`",
        KILL_WAIT.as_secs()
    )]
    Survivors {
        service: String,
        colour: Colour,
        pids: Vec<u32>,
    },
}

impl DriverError {
    /// Whether trying again unchanged may succeed. The others need the config or the machine
    /// fixed first.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            DriverError::Spawn { .. } | DriverError::NoPort { .. } | DriverError::Survivors { .. }
        )
    }
}

/// The running instances of one colour of one service, each watched by a supervisor task.
///
/// Needs a tokio runtime (the supervisors are tasks on it).
pub struct ProcessGroup {
    spec: Arc<InstanceSpec>,
    /// The current instances, by index. Supervisors update it; subscribers see each change.
    info: watch::Sender<Vec<InstanceInfo>>,
    /// Orders to the supervisors. Dropping it (dropping the group) means [`Control::Stop`].
    control: watch::Sender<Control>,
    /// The supervisors, until `stop` or `detach` collected them. A tokio mutex: a second `stop`
    /// waits for the first to finish instead of returning while processes still run.
    tasks: tokio::sync::Mutex<Vec<JoinHandle<Outcome>>>,
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("spec", &self.spec)
            .field("instances", &*self.info.borrow())
            .finish()
    }
}

impl ProcessGroup {
    /// Starts `spec.instances` copies of the command on free ports and supervises them. Fails,
    /// with nothing left running, if any of them cannot be spawned.
    pub async fn start(spec: InstanceSpec) -> Result<ProcessGroup, DriverError> {
        check(&spec)?;
        // Opening logs and forking block: done on a blocking thread, not the daemon's.
        let for_spawn = spec.clone();
        let spawned = off_async(move || {
            let mut slots = Vec::new();
            for index in 0..for_spawn.instances {
                match start_slot(&for_spawn, index, None) {
                    Ok(slot) => slots.push(slot),
                    Err(e) => return (slots, Some(e)),
                }
            }
            (slots, None)
        })
        .await;
        let (slots, failed) = match spawned {
            Ok(r) => r,
            Err(e) => {
                return Err(DriverError::Spawn {
                    service: spec.service.clone(),
                    colour: spec.colour,
                    index: 0,
                    command: spec.command.clone(),
                    source: io::Error::other(e.to_string()),
                })
            }
        };
        if let Some(e) = failed {
            kill_slots(slots).await;
            return Err(e);
        }
        Ok(ProcessGroup::launch(spec, slots))
    }

    /// Takes over the instances an earlier cutover recorded for this colour, and starts those
    /// that are gone (on their recorded port when it is free). Recorded instances that are not
    /// wanted any more are stopped. If an instance cannot be started, the ones this call started
    /// are killed and the adopted ones are left running as they were (still recorded, so a later
    /// `adopt` or [`stop_recorded`] can deal with them).
    pub async fn adopt(
        spec: InstanceSpec,
        recorded: Vec<Recorded>,
    ) -> Result<(ProcessGroup, AdoptReport), DriverError> {
        if spec.instances == 0 || spec.instances > MAX_INSTANCES {
            return Err(bad_instances(&spec));
        }
        let mut report = AdoptReport::default();
        let mut adopted: Vec<Option<(Proc, u16)>> = (0..spec.instances).map(|_| None).collect();
        let mut ports: Vec<Option<u16>> = vec![None; spec.instances as usize];
        let mut unwanted = Vec::new();
        // Classifying reads /proc (all of it, for a group whose leader is gone): off the async
        // threads. Should that thread not come back, classify here rather than guess.
        let copy = recorded.clone();
        let classified = match off_async(move || copy.into_iter().map(|r| (classify(&r), r)).collect()).await {
            Ok(c) => c,
            Err(_) => recorded.into_iter().map(|r| (classify(&r), r)).collect::<Vec<_>>(),
        };
        for (found, r) in classified {
            let wanted = r.index < spec.instances && adopted[r.index as usize].is_none();
            if r.index < spec.instances && ports[r.index as usize].is_none() {
                ports[r.index as usize] = Some(r.port);
            }
            match found {
                Found::Alive => {
                    let proc = Proc::adopted(&r);
                    if wanted {
                        adopted[r.index as usize] = Some((proc, r.port));
                    } else {
                        report.stopped.push(r);
                        unwanted.push(proc);
                    }
                }
                Found::Leftovers => {
                    tracing::warn!(service = %spec.service, colour = %spec.colour, index = r.index, pid = r.pid,
                        "recorded instance is gone but processes of its group remain; killing them");
                    unwanted.push(Proc::adopted(&r));
                }
                Found::Gone => {}
            }
        }
        // Leftovers first: they may hold the ports the fresh instances are about to use.
        let survivors = terminate_all(&mut unwanted, spec.grace).await;
        if !survivors.is_empty() {
            tracing::error!(service = %spec.service, colour = %spec.colour, ?survivors, "unwanted processes survived SIGKILL");
        }

        let mut slots = Vec::new();
        let mut fresh = Vec::new();
        for (index, found) in adopted.into_iter().enumerate() {
            let index = index as u32;
            match found {
                Some((proc, port)) => {
                    append_marker(
                        &log_path(&spec.state_dir, &spec.service, spec.colour, index),
                        &format!("adopted pid {} by cutover pid {}", proc.pid, std::process::id()),
                    );
                    report.adopted.push(index);
                    slots.push(Slot {
                        index,
                        port: PortLease::claim(port),
                        proc: Some(proc),
                        adopted: true,
                    });
                }
                None => fresh.push(index),
            }
        }
        if !fresh.is_empty() {
            if let Err(e) = check(&spec) {
                disown(slots);
                return Err(e);
            }
        }
        let mut started = Vec::new();
        for index in fresh {
            match start_slot(&spec, index, ports[index as usize]) {
                Ok(slot) => started.push(slot),
                Err(e) => {
                    kill_slots(started).await;
                    disown(slots);
                    return Err(e);
                }
            }
            report.started.push(index);
        }
        slots.extend(started);
        slots.sort_by_key(|s| s.index);
        tracing::info!(service = %spec.service, colour = %spec.colour, adopted = ?report.adopted,
            started = ?report.started, stopped = report.stopped.len(), "adopted instances");
        Ok((ProcessGroup::launch(spec, slots), report))
    }

    fn launch(spec: InstanceSpec, slots: Vec<Slot>) -> ProcessGroup {
        let spec = Arc::new(spec);
        let infos = slots
            .iter()
            .map(|s| InstanceInfo {
                index: s.index,
                port: s.port.port,
                pid: s.proc.as_ref().map(|p| p.pid),
                pgid: s.proc.as_ref().map(|p| p.pgid),
                start_time: s.proc.as_ref().and_then(|p| p.start_time),
                restarts: 0,
                state: InstanceState::Running,
                adopted: s.adopted,
                last_exit: None,
                last_exit_code: None,
                quick_exits: 0,
                last_output: Vec::new(),
                log: log_path(&spec.state_dir, &spec.service, spec.colour, s.index),
            })
            .collect();
        let (info, _) = watch::channel(infos);
        let (control, _) = watch::channel(Control::Run);
        let tasks = slots
            .into_iter()
            .enumerate()
            .map(|(position, slot)| {
                let sup = Supervisor {
                    spec: spec.clone(),
                    position,
                    index: slot.index,
                    port: slot.port,
                    proc: slot.proc,
                    started: Instant::now(),
                    failures: 0,
                    quick_exits: 0,
                    delay: Duration::ZERO,
                    info: info.clone(),
                };
                tokio::spawn(supervise_restarting(sup, control.subscribe()))
            })
            .collect();
        ProcessGroup {
            spec,
            info,
            control,
            tasks: tokio::sync::Mutex::new(tasks),
        }
    }

    /// What this group was started with.
    pub fn spec(&self) -> &InstanceSpec {
        &self.spec
    }

    /// The instances now, by index.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.info.borrow().clone()
    }

    /// The instances, notified on every change (start, exit, restart, port move, stop): rebuild
    /// routes and health checks and persist [`InstanceInfo::recorded`] from it.
    pub fn subscribe(&self) -> watch::Receiver<Vec<InstanceInfo>> {
        self.info.subscribe()
    }

    /// What to persist for adoption: the instances that have a process now.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.info.borrow().iter().filter_map(InstanceInfo::recorded).collect()
    }

    /// Stops every instance: SIGTERM (and SIGCONT, for stopped processes) to each whole process
    /// group, SIGKILL to what remains after the grace period, and waits until the groups are
    /// gone; nothing is restarted any more. Idempotent: later calls wait for the first to finish
    /// and return `Ok`. Takes at most the grace period plus a few seconds; fails only if
    /// processes survive SIGKILL.
    pub async fn stop(&self) -> Result<(), DriverError> {
        let mut tasks = self.tasks.lock().await;
        self.control.send_replace(Control::Stop);
        let mut survivors = Vec::new();
        // A handle is removed only once it completed, so a `stop` cancelled half-way leaves the
        // rest for the next call to wait for (awaiting a completed handle again would panic).
        while let Some(task) = tasks.last_mut() {
            let result = task.await;
            tasks.pop();
            match result {
                Ok(Outcome::Stopped(pids)) => survivors.extend(pids),
                Ok(Outcome::Detached(_)) => {}
                // Panics are caught by `supervise_restarting`; this is a cancelled task.
                Err(e) => tracing::error!(service = %self.spec.service, colour = %self.spec.colour, error = %e,
                    "instance supervisor failed"),
            }
        }
        if survivors.is_empty() {
            Ok(())
        } else {
            Err(DriverError::Survivors {
                service: self.spec.service.clone(),
                colour: self.spec.colour,
                pids: survivors,
            })
        }
    }

    /// Stops supervising and leaves the processes running, as a crash of the daemon would: for
    /// handing instances over to another cutover, which calls [`ProcessGroup::adopt`] with the
    /// returned records. An instance waiting to be restarted has no process and no record.
    pub async fn detach(self) -> Vec<Recorded> {
        let mut tasks = self.tasks.lock().await;
        self.control.send_replace(Control::Detach);
        let mut recorded = Vec::new();
        while let Some(task) = tasks.last_mut() {
            let result = task.await;
            tasks.pop();
            if let Ok(Outcome::Detached(Some(r))) = result {
                recorded.push(r);
            }
        }
        recorded.sort_by_key(|r| r.index);
        recorded
    }
}

/// Stops instances recorded by an earlier cutover without taking them over (the daemon's
/// `StopInstances` for a colour it did not adopt). Same escalation as [`ProcessGroup::stop`].
/// Records whose process is gone, or whose pid now belongs to another process, are skipped, so
/// this is idempotent. Returns how many instances were still running.
pub async fn stop_recorded(
    service: &str,
    colour: Colour,
    recorded: &[Recorded],
    grace: Duration,
) -> Result<usize, DriverError> {
    let mut procs: Vec<Proc> = recorded
        .iter()
        .filter(|r| !matches!(classify(r), Found::Gone))
        .map(Proc::adopted)
        .collect();
    let count = procs.len();
    let survivors = terminate_all(&mut procs, grace).await;
    if survivors.is_empty() {
        Ok(count)
    } else {
        Err(DriverError::Survivors {
            service: service.to_string(),
            colour,
            pids: survivors,
        })
    }
}

/// An order from the [`ProcessGroup`] to its supervisors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Run,
    Stop,
    Detach,
}

/// How a supervisor ended.
enum Outcome {
    /// Stopped; the pids that survived SIGKILL, if any.
    Stopped(Vec<u32>),
    /// Detached; the record of its running process, if it had one.
    Detached(Option<Recorded>),
}

/// An instance before its supervisor exists.
struct Slot {
    index: u32,
    port: PortLease,
    proc: Option<Proc>,
    adopted: bool,
}

fn bad_instances(spec: &InstanceSpec) -> DriverError {
    DriverError::BadInstances {
        service: spec.service.clone(),
        colour: spec.colour,
        instances: spec.instances,
        max: MAX_INSTANCES,
    }
}

/// The checks whose failure no retry fixes, before anything is spawned.
fn check(spec: &InstanceSpec) -> Result<(), DriverError> {
    if spec.instances == 0 || spec.instances > MAX_INSTANCES {
        return Err(bad_instances(spec));
    }
    if !Path::new(SHELL).exists() {
        return Err(DriverError::ShellMissing {
            service: spec.service.clone(),
            colour: spec.colour,
            command: spec.command.clone(),
        });
    }
    let workdir_error = |source| DriverError::Workdir {
        service: spec.service.clone(),
        colour: spec.colour,
        command: spec.command.clone(),
        dir: spec.workdir.clone(),
        source,
    };
    match fs::metadata(&spec.workdir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(workdir_error(io::Error::other("not a directory"))),
        Err(e) => Err(workdir_error(e)),
    }
}

/// Spawns instance `index` on `port` if given and free, otherwise on a new free port.
fn start_slot(spec: &InstanceSpec, index: u32, port: Option<u16>) -> Result<Slot, DriverError> {
    let lease = match port.and_then(PortLease::reuse) {
        Some(lease) => lease,
        None => PortLease::free().map_err(|source| DriverError::NoPort {
            service: spec.service.clone(),
            colour: spec.colour,
            index,
            source,
        })?,
    };
    let proc = spawn(spec, index, lease.port, "starting").map_err(|e| e.into_driver_error(spec, index))?;
    Ok(Slot {
        index,
        port: lease,
        proc: Some(proc),
        adopted: false,
    })
}

/// Kills what a failed start had already spawned.
async fn kill_slots(slots: Vec<Slot>) {
    let mut procs: Vec<Proc> = slots.into_iter().filter_map(|s| s.proc).collect();
    terminate_all(&mut procs, Duration::ZERO).await;
}

/// Lets go of adopted processes without touching them.
fn disown(slots: Vec<Slot>) {
    for slot in slots {
        if let Some(mut proc) = slot.proc {
            proc.settled = true;
        }
    }
}

enum SpawnError {
    Log(PathBuf, io::Error),
    Spawn(String, io::Error),
}

impl SpawnError {
    fn into_driver_error(self, spec: &InstanceSpec, index: u32) -> DriverError {
        match self {
            SpawnError::Log(path, source) => DriverError::Log {
                service: spec.service.clone(),
                colour: spec.colour,
                path,
                source,
            },
            SpawnError::Spawn(command, source) => DriverError::Spawn {
                service: spec.service.clone(),
                colour: spec.colour,
                index,
                command,
                source,
            },
        }
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Log(path, e) => write!(f, "cannot write the log file {}: {e}", path.display()),
            SpawnError::Spawn(_, e) => write!(f, "cannot spawn /bin/sh: {e}"),
        }
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// A line from cutover itself in an instance's log, so that `cutover logs` shows where one
/// process ends and the next begins. Best effort: a log we cannot write is no reason to stop.
fn append_marker(path: &Path, text: &str) {
    if let Ok(mut log) = open_log(path) {
        let _ = writeln!(log, "=== {} cutover: {text}", utc_timestamp(unix_now()));
    }
}

/// Whether `line` is one of cutover's own lines in an instance log ([`append_marker`], [`spawn`]).
fn is_marker(line: &str) -> bool {
    // "=== " and a 20-character UTC timestamp come before it.
    line.starts_with("=== ") && line.get(24..).is_some_and(|rest| rest.starts_with(" cutover: "))
}

/// The last lines the most recent process wrote to the log at `path` (see
/// [`InstanceInfo::last_output`]); empty if the log cannot be read. Best effort, like the log.
fn output_tail(path: &Path) -> Vec<String> {
    let read = || -> io::Result<(Vec<u8>, bool)> {
        let mut file = File::open(path)?;
        let from = file.metadata()?.len().saturating_sub(OUTPUT_TAIL_BYTES);
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.take(OUTPUT_TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok((bytes, from > 0))
    };
    match read() {
        Ok((bytes, cut)) => last_lines(&String::from_utf8_lossy(&bytes), cut),
        Err(_) => Vec::new(),
    }
}

/// The non-empty lines after the last marker of `text`, at most [`OUTPUT_TAIL_LINES`], each cut
/// at [`OUTPUT_LINE_CHARS`] and with control characters replaced (they end up on terminals).
/// `cut`: `text` starts in the middle of the log, so its first line is partial and left out.
fn last_lines(text: &str, cut: bool) -> Vec<String> {
    let lines: Vec<&str> = text.lines().skip(usize::from(cut)).collect();
    let own = lines.iter().rposition(|l| is_marker(l)).map_or(0, |m| m + 1);
    let own: Vec<&str> = lines[own..].iter().copied().filter(|l| !l.trim().is_empty()).collect();
    own[own.len().saturating_sub(OUTPUT_TAIL_LINES)..]
        .iter()
        .map(|line| {
            let mut clean: String = line
                .chars()
                .take(OUTPUT_LINE_CHARS)
                .map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c })
                .collect();
            if line.chars().nth(OUTPUT_LINE_CHARS).is_some() {
                clean.push('…');
            }
            clean
        })
        .collect()
}

/// Spawns one instance process in its own group, output appended to its log.
fn spawn(spec: &InstanceSpec, index: u32, port: u16, why: &str) -> Result<Proc, SpawnError> {
    let path = log_path(&spec.state_dir, &spec.service, spec.colour, index);
    let command = spec.command.replace("{port}", &port.to_string());
    let mut stdout = open_log(&path).map_err(|e| SpawnError::Log(path.clone(), e))?;
    let stderr = stdout.try_clone().map_err(|e| SpawnError::Log(path.clone(), e))?;
    let _ = writeln!(
        stdout,
        "=== {} cutover: {why} {} {}-{index} ({}) on 127.0.0.1:{port}: {command}",
        utc_timestamp(unix_now()),
        spec.service,
        spec.colour,
        spec.version
    );
    let child = Command::new(SHELL)
        .arg("-c")
        .arg(&command)
        .current_dir(&spec.workdir)
        .env("PORT", port.to_string())
        .env("CUTOVER_SERVICE", &spec.service)
        .env("CUTOVER_COLOUR", spec.colour.as_str())
        .env("CUTOVER_VERSION", &spec.version)
        .env("CUTOVER_INSTANCE", index.to_string())
        .envs(spec.peers.iter().flat_map(|p| {
            [
                ("CUTOVER_PEER_URL", p.url.as_str()),
                ("CUTOVER_PEER_TOKEN", p.token.as_str()),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| {
            append_marker(&path, &format!("could not start: {e}"));
            SpawnError::Spawn(command, e)
        })?;
    Ok(Proc::child(child))
}

/// How an instance process ended.
struct Exit {
    /// [`InstanceInfo::last_exit`].
    how: String,
    /// [`InstanceInfo::last_exit_code`].
    code: Option<i32>,
}

/// One instance process: our child, or adopted from an earlier cutover.
struct Proc {
    pid: u32,
    pgid: u32,
    start_time: Option<u64>,
    /// `Some` for our own children: waited for with `waitid`, reaped last (see the module doc).
    child: Option<Child>,
    /// Set once the group is gone (or deliberately left running); until then Drop kills it.
    settled: bool,
}

impl Proc {
    fn child(child: Child) -> Proc {
        let pid = child.id();
        Proc {
            pid,
            // process_group(0): the child leads a new group numbered after itself.
            pgid: pid,
            // The child exists (possibly as an unreaped zombie), so /proc has it.
            start_time: proc_stat(pid).map(|s| s.start_time),
            child: Some(child),
            settled: false,
        }
    }

    fn adopted(r: &Recorded) -> Proc {
        Proc {
            pid: r.pid,
            pgid: r.pgid,
            start_time: r.start_time,
            child: None,
            settled: false,
        }
    }

    /// `Some` once the leader has exited. Does not reap it.
    fn exit_status(&mut self) -> Option<Exit> {
        let how = |how: String| Exit { how, code: None };
        if self.child.is_none() {
            return (!alive(self.pid, self.start_time))
                .then(|| how("exited (status unknown: started by an earlier cutover)".to_string()));
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(Pid::from_raw(self.pid as i32)), flags) {
            Ok(WaitStatus::Exited(_, code)) => Some(Exit {
                how: format!("exited with status {code}"),
                code: Some(code),
            }),
            Ok(WaitStatus::Signaled(_, signal, _)) => Some(how(format!("killed by {signal}"))),
            Ok(_) => None,
            Err(Errno::EINTR) => None,
            // ECHILD: someone reaped it behind our back; it is gone either way.
            Err(e) => Some(how(format!("exited (status lost: {e})"))),
        }
    }

    fn signal(&self, signal: Signal) {
        // Only while the group exists: Linux gives no other group its number while any process
        // of it (a zombie leader included) is left, so for adopted groups that is what keeps the
        // number ours. `kill(-pgid, 0)` tells in one system call, without reading all of /proc.
        if signal_group(self.pgid, None).is_ok() {
            if let Err(e) = signal_group(self.pgid, Some(signal)) {
                if e != Errno::ESRCH {
                    tracing::warn!(pgid = self.pgid, %signal, error = %e, "cannot signal instance process group");
                }
            }
        }
    }

    /// Reaps the leader if it is our child (or our zombie, when adopted from this same process).
    fn reap(&mut self) {
        match &mut self.child {
            Some(child) => {
                let _ = child.try_wait();
            }
            None => reap_if_our_zombie(self.pid, self.start_time),
        }
    }

    /// After the leader exited: kills what is left of its group, then reaps the leader.
    async fn clean_up_after_exit(mut self) {
        if members_of(std::slice::from_ref(&self))
            .await
            .iter()
            .any(|m| !m.is_empty())
        {
            tracing::debug!(pgid = self.pgid, "killing what is left of an exited instance's group");
            self.signal(Signal::SIGKILL);
            wait_gone(std::slice::from_mut(&mut self), KILL_WAIT).await;
        }
        self.reap();
        self.settled = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.settled {
            // The supervisor was dropped mid-way (runtime shutdown, panic): never leave an instance
            // running that nobody watches or recorded as handed over.
            self.signal(Signal::SIGKILL);
            self.reap();
        }
    }
}

/// SIGTERM (and SIGCONT, so that stopped processes see it) to every group, SIGKILL to the groups
/// still alive after `grace`, then waits for them to be gone and reaps the leaders. Returns the
/// pids that survived even SIGKILL.
async fn terminate_all(procs: &mut [Proc], grace: Duration) -> Vec<u32> {
    if procs.is_empty() {
        return Vec::new();
    }
    for p in procs.iter() {
        p.signal(Signal::SIGTERM);
        p.signal(Signal::SIGCONT);
    }
    if !wait_gone(procs, grace).await {
        let left_over = members_of(procs).await;
        for (p, left) in procs.iter().zip(left_over) {
            if !left.is_empty() {
                tracing::warn!(pgid = p.pgid, pids = ?left, grace = ?grace, "still running after the grace period; sending SIGKILL");
                p.signal(Signal::SIGKILL);
            }
        }
        wait_gone(procs, KILL_WAIT).await;
    }
    let mut survivors = Vec::new();
    let left_over = members_of(procs).await;
    for (p, left) in procs.iter_mut().zip(left_over) {
        survivors.extend(left);
        p.reap();
        p.settled = true;
    }
    survivors
}

/// Polls until no group in `procs` has a live member, for at most `limit`. True if they are gone.
async fn wait_gone(procs: &mut [Proc], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        if members_of(procs).await.iter().all(Vec::is_empty) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        sleep_until((now + pause).min(deadline)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends `signal` (or checks existence, with `None`) to process group `pgid`. Refuses 0 and 1
/// (which `killpg` reads as "my own group" and init's) and cutover's own group: a corrupt record
/// must never make cutover signal itself.
fn signal_group(pgid: u32, signal: Option<Signal>) -> nix::Result<()> {
    let pgid = match i32::try_from(pgid) {
        Ok(p) if p > 1 => Pid::from_raw(p),
        _ => return Err(Errno::ESRCH),
    };
    if pgid == getpgrp() {
        return Err(Errno::ESRCH);
    }
    killpg(pgid, signal)
}

/// Runs `f` on a blocking thread: for what reads all of /proc, opens files or forks, so that the
/// daemon's async threads (health checks, the admin API, timers) never wait on it.
async fn off_async<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

/// The live members of each group in `procs`, in order, read off the async threads. A scan that
/// could not run reports its groups as still alive, so that nothing is taken for gone unseen.
async fn members_of(procs: &[Proc]) -> Vec<Vec<u32>> {
    let pgids: Vec<u32> = procs.iter().map(|p| p.pgid).collect();
    let fallback = pgids.iter().map(|&g| vec![g]).collect();
    off_async(move || pgids.into_iter().map(group_members).collect())
        .await
        .unwrap_or(fallback)
}

/// The live (not zombie) processes of group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    if signal_group(pgid, None) == Err(Errno::ESRCH) {
        return Vec::new();
    }
    let Ok(dir) = fs::read_dir("/proc") else {
        // No /proc: trust kill(0), which counts zombies too.
        return vec![pgid];
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.pgrp == pgid && !s.is_dead()))
        .collect()
}

/// The fields of `/proc/<pid>/stat` this driver needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
    start_time: u64,
}

impl ProcStat {
    /// A zombie, or on its way out: it holds nothing and runs nothing.
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid (comm) state ppid pgrp session ... starttime(22) ...`; `comm` may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // Fields 6 to 21 lie between pgrp (5) and starttime (22).
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

/// Whether `pid` runs and is the process that started at `start_time` (when known).
fn alive(pid: u32, start_time: Option<u64>) -> bool {
    proc_stat(pid).is_some_and(|s| !s.is_dead() && start_time.unwrap_or(s.start_time) == s.start_time)
}

/// Reaps `pid` if it is a zombie child of this very process with the expected start time. That
/// happens only when a group was detached and adopted within one process (handover, tests); the
/// checks make sure we never reap a child some other part of cutover waits for.
fn reap_if_our_zombie(pid: u32, start_time: Option<u64>) {
    let ours =
        proc_stat(pid).is_some_and(|s| s.is_dead() && s.ppid == std::process::id() && start_time == Some(s.start_time));
    if ours {
        let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
    }
}

/// What became of a recorded instance.
enum Found {
    /// The recorded process runs: adopt (or stop) it.
    Alive,
    /// The leader is gone, members of its group are not: leftovers of this instance.
    Leftovers,
    /// Nothing of it runs, or its pid now belongs to someone else: leave it alone.
    Gone,
}

fn classify(r: &Recorded) -> Found {
    if r.pid <= 1 || r.pgid <= 1 {
        return Found::Gone;
    }
    match proc_stat(r.pid) {
        Some(s) if !s.is_dead() => {
            if s.pgrp == r.pgid && r.start_time.unwrap_or(s.start_time) == s.start_time {
                Found::Alive
            } else {
                // The pid was reused: another process, and (the pid having been free) no group of
                // ours can still carry the number.
                Found::Gone
            }
        }
        // The leader exited (or is an unreaped zombie, which still pins the group id). Live
        // members of its group can only be the instance's own: Linux keeps a group id from
        // being reused while a member lives.
        _ if !group_members(r.pgid).is_empty() => Found::Leftovers,
        _ => Found::Gone,
    }
}

/// Ports given to instances by this process, so that two instances never get the same one.
fn leased_ports() -> &'static Mutex<HashSet<u16>> {
    static LEASED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    LEASED.get_or_init(Default::default)
}

fn with_leased<T>(f: impl FnOnce(&mut HashSet<u16>) -> T) -> T {
    // A panic while holding this lock cannot leave the set half-updated (single insert/remove).
    let mut set = leased_ports().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(&mut set)
}

/// A port given to one instance; returned to the pool on drop.
struct PortLease {
    port: u16,
    /// False when the port was already leased (an adopted instance on a port this process also
    /// gave out, which should not happen): then dropping must not free the other lease.
    owned: bool,
}

impl PortLease {
    /// A port the kernel says is free and no instance of ours has.
    fn free() -> io::Result<PortLease> {
        // Listeners stay open until we are done so the kernel offers a different port each time.
        let mut held = Vec::new();
        for _ in 0..64 {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let port = listener.local_addr()?.port();
            if with_leased(|set| set.insert(port)) {
                return Ok(PortLease { port, owned: true });
            }
            held.push(listener);
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "every port the kernel offered is already given to an instance",
        ))
    }

    /// `port` again, if no instance of ours has it and nobody listens on it.
    fn reuse(port: u16) -> Option<PortLease> {
        if !with_leased(|set| set.insert(port)) {
            return None;
        }
        let lease = PortLease { port, owned: true };
        // std sets SO_REUSEADDR, so sockets in TIME_WAIT do not count as taken.
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).ok().map(|_| lease)
    }

    /// The port of an adopted, running instance.
    fn claim(port: u16) -> PortLease {
        let owned = with_leased(|set| set.insert(port));
        if !owned {
            tracing::warn!(port, "adopted instance uses a port already given to another instance");
        }
        PortLease { port, owned }
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if self.owned {
            with_leased(|set| set.remove(&self.port));
        }
    }
}

/// Watches one instance: restarts it when it exits, stops or detaches it on order.
struct Supervisor {
    spec: Arc<InstanceSpec>,
    /// Position of this instance in the info vector.
    position: usize,
    index: u32,
    port: PortLease,
    /// The running process; `None` between an exit and the restart.
    proc: Option<Proc>,
    /// When the current process started (or was adopted), for the backoff reset.
    started: Instant,
    /// Quick exits in a row, for the backoff.
    failures: u32,
    /// [`InstanceInfo::quick_exits`]. Not `failures`: that one also counts failed spawns, and
    /// counts an exit after a long run as the first of a new series.
    quick_exits: u32,
    /// The wait before the next restart attempt.
    delay: Duration,
    info: watch::Sender<Vec<InstanceInfo>>,
}

/// Reads an order; a closed channel (the group was dropped) means stop.
fn order(changed: Result<(), watch::error::RecvError>, control: &mut watch::Receiver<Control>) -> Control {
    match changed {
        Ok(()) => *control.borrow_and_update(),
        Err(_) => Control::Stop,
    }
}

/// [`supervise`], and after a panic a new supervisor for the same instance.
///
/// The panicking supervisor's process was killed as its [`Proc`] was dropped (a process nobody
/// watches must not run on). The new one starts the instance again after the backoff, as after
/// an exit: a bug in the driver costs the instance a restart, not its place in the group for the
/// rest of the group's life. Logged as an error, and published as the instance's last exit.
async fn supervise_restarting(sup: Supervisor, control: watch::Receiver<Control>) -> Outcome {
    use futures_util::FutureExt;
    let (spec, position, index, info) = (sup.spec.clone(), sup.position, sup.index, sup.info.clone());
    let mut panics: u32 = 0;
    let mut next = sup;
    loop {
        // A clone sees every order given since the group started, so none given while the
        // panicking supervisor ran is missed. Unwind safety: a supervisor shares only the info
        // channel, whose value is whole between its locked updates.
        let run = std::panic::AssertUnwindSafe(supervise(next, control.clone()));
        let payload = match run.catch_unwind().await {
            Ok(outcome) => return outcome,
            Err(payload) => payload,
        };
        let reason = crate::panics::message(payload.as_ref());
        let delay = spec.backoff.delay(panics);
        panics = panics.saturating_add(1);
        tracing::error!(service = %spec.service, colour = %spec.colour, index, panic = %reason, ?delay,
            "instance supervisor panicked; its process was killed and the instance restarts");
        match *control.borrow() {
            Control::Stop => return Outcome::Stopped(Vec::new()),
            Control::Detach => return Outcome::Detached(None),
            Control::Run => {}
        }
        // The port the instance had last (it may have moved since the group started).
        let port = info.borrow().get(position).map_or(0, |i| i.port);
        next = Supervisor {
            spec: spec.clone(),
            position,
            index,
            port: PortLease::claim(port),
            proc: None,
            started: Instant::now(),
            failures: panics,
            quick_exits: 0,
            delay,
            info: info.clone(),
        };
        next.publish(|i| {
            i.state = InstanceState::Restarting;
            i.pid = None;
            i.pgid = None;
            i.start_time = None;
            i.last_exit = Some(format!("its supervisor failed ({reason}) and killed it"));
            i.last_exit_code = None;
        });
    }
}

async fn supervise(mut sup: Supervisor, mut control: watch::Receiver<Control>) -> Outcome {
    loop {
        // Running: wait for the process to exit, or for an order. A supervisor that took over
        // from one that panicked has no process yet: it begins with the restart.
        if sup.proc.is_some() {
            let status = loop {
                tokio::select! {
                    changed = control.changed() => match order(changed, &mut control) {
                        Control::Stop => return sup.stop().await,
                        Control::Detach => return sup.detach(),
                        Control::Run => {}
                    },
                    _ = sleep(POLL) => {
                        #[cfg(test)]
                        tests::panic_if_asked(&sup.spec, sup.index);
                        if let Some(status) = sup.proc.as_mut().and_then(Proc::exit_status) {
                            break status;
                        }
                    }
                }
            };
            sup.exited(status).await;
        }
        // Restarting: wait out the backoff (an order cuts it short), then spawn; a failed spawn
        // backs off again.
        loop {
            let until = Instant::now() + sup.delay;
            loop {
                tokio::select! {
                    changed = control.changed() => match order(changed, &mut control) {
                        Control::Stop => return sup.stop().await,
                        Control::Detach => return sup.detach(),
                        Control::Run => {}
                    },
                    _ = sleep_until(until) => break,
                }
            }
            if sup.restart().await {
                break;
            }
        }
    }
}

impl Supervisor {
    fn publish(&self, change: impl FnOnce(&mut InstanceInfo)) {
        self.info.send_modify(|all| change(&mut all[self.position]));
    }

    fn log(&self) -> PathBuf {
        log_path(&self.spec.state_dir, &self.spec.service, self.spec.colour, self.index)
    }

    /// The process exited on its own: clean up its group and schedule the restart.
    async fn exited(&mut self, exit: Exit) {
        let Exit { how: status, code } = exit;
        let Some(proc) = self.proc.take() else { return };
        let pid = proc.pid;
        proc.clean_up_after_exit().await;
        let uptime = self.started.elapsed();
        if uptime >= self.spec.backoff.reset_after {
            self.failures = 0;
            self.quick_exits = 0;
        } else {
            self.quick_exits = self.quick_exits.saturating_add(1);
        }
        self.delay = self.spec.backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        // Read before the exit marker is appended: the process's own lines are those after the
        // last marker.
        let output = output_tail(&self.log());
        tracing::warn!(service = %self.spec.service, colour = %self.spec.colour, index = self.index, pid,
            port = self.port.port, %status, ?uptime, delay = ?self.delay, "instance exited; restarting");
        append_marker(
            &self.log(),
            &format!("pid {pid} {status} after {uptime:.1?}; restarting in {:?}", self.delay),
        );
        self.publish(|i| {
            i.state = InstanceState::Restarting;
            i.pid = None;
            i.pgid = None;
            i.start_time = None;
            i.last_exit = Some(status);
            i.last_exit_code = code;
            i.quick_exits = self.quick_exits;
            i.last_output = output;
        });
    }

    /// Starts a new process, on the same port unless someone else took it. False if it failed
    /// (the next attempt waits longer).
    async fn restart(&mut self) -> bool {
        if TcpListener::bind((Ipv4Addr::LOCALHOST, self.port.port)).is_err() {
            match PortLease::free() {
                Ok(lease) => {
                    tracing::warn!(service = %self.spec.service, colour = %self.spec.colour, index = self.index,
                        old = self.port.port, new = lease.port, "port taken by another program; instance moves");
                    self.port = lease;
                }
                Err(e) => tracing::warn!(service = %self.spec.service, colour = %self.spec.colour,
                    index = self.index, error = %e, "port taken and no free port; trying the old one"),
            }
        }
        let (spec, index, port) = (self.spec.clone(), self.index, self.port.port);
        let spawned = off_async(move || spawn(&spec, index, port, "restarting"))
            .await
            .unwrap_or_else(|e| Err(SpawnError::Spawn(String::new(), io::Error::other(e.to_string()))));
        match spawned {
            Ok(proc) => {
                let (pid, start_time, port) = (proc.pid, proc.start_time, self.port.port);
                self.proc = Some(proc);
                self.started = Instant::now();
                self.publish(|i| {
                    i.state = InstanceState::Running;
                    i.pid = Some(pid);
                    i.pgid = Some(pid);
                    i.start_time = start_time;
                    i.port = port;
                    i.restarts += 1;
                    i.adopted = false;
                });
                tracing::info!(service = %self.spec.service, colour = %self.spec.colour, index = self.index, pid,
                    port, "instance restarted");
                true
            }
            Err(e) => {
                self.delay = self.spec.backoff.delay(self.failures);
                self.failures = self.failures.saturating_add(1);
                tracing::warn!(service = %self.spec.service, colour = %self.spec.colour, index = self.index,
                    error = %e, delay = ?self.delay, "cannot restart instance");
                let reason = format!("could not restart: {e}");
                self.publish(|i| {
                    i.last_exit = Some(reason);
                    i.last_exit_code = None;
                });
                false
            }
        }
    }

    async fn stop(mut self) -> Outcome {
        let mut survivors = Vec::new();
        if let Some(mut proc) = self.proc.take() {
            self.publish(|i| i.state = InstanceState::Stopping);
            survivors = terminate_all(std::slice::from_mut(&mut proc), self.spec.grace).await;
            append_marker(&self.log(), &format!("stopped pid {}", proc.pid));
        }
        self.publish(|i| {
            i.state = InstanceState::Stopped;
            i.pid = None;
            i.pgid = None;
            i.start_time = None;
        });
        tracing::info!(service = %self.spec.service, colour = %self.spec.colour, index = self.index, "instance stopped");
        Outcome::Stopped(survivors)
    }

    fn detach(mut self) -> Outcome {
        let recorded = self.proc.take().map(|mut proc| {
            proc.settled = true;
            Recorded {
                index: self.index,
                pid: proc.pid,
                pgid: proc.pgid,
                port: self.port.port,
                start_time: proc.start_time,
            }
        });
        Outcome::Detached(recorded)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_timestamp(secs: u64) -> String {
    let ((year, month, day), (h, m, s)) = utc_civil(secs);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// `secs` since the epoch as a UTC date and time of day, ((year, month, day), (hour, minute,
/// second)) in the proleptic Gregorian calendar (Howard Hinnant's civil-from-days). The log
/// markers and `cutover history` both show times with it.
pub fn utc_civil(secs: u64) -> ((i64, i64, i64), (u64, u64, u64)) {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    ((year, month, day), (rest / 3_600, rest % 3_600 / 60, rest % 60))
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use nix::sys::signal::kill;

    use super::*;

    fn spec(dir: &Path, command: &str, instances: u32) -> InstanceSpec {
        InstanceSpec {
            service: "web".to_string(),
            colour: Colour::Green,
            version: "v2".to_string(),
            command: command.to_string(),
            instances,
            workdir: dir.to_path_buf(),
            state_dir: dir.join("state"),
            grace: Duration::from_secs(60),
            peers: None,
            backoff: Backoff::default(),
        }
    }

    /// Polls `cond` every 20 ms until it holds; fails naming `what` after `secs` seconds.
    async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn accepts(port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    /// A process seen running, identified by pid and start time so that a reused pid does not
    /// count as the same process.
    #[derive(Clone, Copy, Debug)]
    struct Seen(u32, u64);

    impl Seen {
        fn new(pid: u32) -> Seen {
            let stat = proc_stat(pid).unwrap_or_else(|| panic!("pid {pid} is not running"));
            assert!(!stat.is_dead(), "pid {pid} is a zombie");
            Seen(pid, stat.start_time)
        }

        /// Present in /proc and not a zombie (a zombie is dead, whoever reaps it).
        fn running(self) -> bool {
            alive(self.0, Some(self.1))
        }
    }

    async fn pid_file(path: PathBuf) -> Seen {
        let read = || fs::read_to_string(&path).ok()?.trim().parse::<u32>().ok();
        wait_until(&format!("{}", path.display()), 30, || read().is_some()).await;
        Seen::new(read().unwrap())
    }

    fn leaders(infos: &[InstanceInfo]) -> Vec<Seen> {
        infos
            .iter()
            .map(|i| Seen::new(i.pid.expect("a running instance has a pid")))
            .collect()
    }

    const HTTP: &str = "exec python3 -m http.server {port} --bind 127.0.0.1";

    /// Supervisors to panic once, at their next poll, by state directory (each test has its own)
    /// and instance index.
    static PANIC_ONCE: std::sync::Mutex<Vec<(PathBuf, u32)>> = std::sync::Mutex::new(Vec::new());

    pub(super) fn panic_if_asked(spec: &InstanceSpec, index: u32) {
        let mut asked = PANIC_ONCE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = asked.iter().position(|(dir, i)| *dir == spec.state_dir && *i == index) {
            asked.remove(at);
            drop(asked);
            panic!("asked to panic by the test");
        }
    }

    #[tokio::test]
    async fn process_a_supervisor_that_panics_is_replaced_and_its_instance_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), HTTP, 2);
        let group = ProcessGroup::start(spec.clone()).await.unwrap();
        let before = group.instances();
        wait_until("both instances to accept connections", 30, || {
            before.iter().all(|i| accepts(i.port))
        })
        .await;
        let old = leaders(&before);

        PANIC_ONCE.lock().unwrap().push((spec.state_dir.clone(), 0));
        wait_until("instance 0 to run again under a new supervisor", 30, || {
            let i = &group.instances()[0];
            i.state == InstanceState::Running && i.pid.is_some() && i.pid != before[0].pid
        })
        .await;
        let after = group.instances();
        assert!(!old[0].running(), "the panicking supervisor's process was killed");
        assert_eq!(after[0].port, before[0].port, "restarted on its port");
        assert!(
            after[0]
                .last_exit
                .as_deref()
                .is_some_and(|e| e.contains("asked to panic by the test")),
            "{:?}",
            after[0].last_exit
        );
        assert_eq!(after[1], before[1], "the other instance is untouched");
        wait_until("the restarted instance to accept connections", 30, || {
            accepts(after[0].port)
        })
        .await;

        // The new supervisor obeys orders as the first did.
        let now = leaders(&after);
        group.stop().await.unwrap();
        assert!(now.iter().chain(&old).all(|p| !p.running()));
        assert!(group.instances().iter().all(|i| i.state == InstanceState::Stopped));
    }

    #[tokio::test]
    async fn process_start_gives_each_instance_a_port_env_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let command = format!(
            "echo \"$PORT $CUTOVER_SERVICE $CUTOVER_COLOUR $CUTOVER_VERSION $CUTOVER_INSTANCE\" > env-$CUTOVER_INSTANCE; \
             echo out-$CUTOVER_INSTANCE; echo err-$CUTOVER_INSTANCE >&2; {HTTP}"
        );
        let group = ProcessGroup::start(spec(dir.path(), &command, 2)).await.unwrap();
        let infos = group.instances();
        assert_eq!(infos.len(), 2);
        assert_ne!(infos[0].port, infos[1].port);
        for (n, i) in infos.iter().enumerate() {
            assert_eq!(i.index, n as u32);
            assert_eq!(i.state, InstanceState::Running);
            assert_eq!((i.restarts, i.adopted, &i.last_exit), (0, false, &None));
            let pid = i.pid.unwrap();
            assert_eq!(i.pgid, Some(pid));
            assert_eq!(
                proc_stat(pid).unwrap().pgrp,
                pid,
                "instance {n} leads its own process group"
            );
            assert_eq!(i.recorded().unwrap().port, i.port);
        }
        wait_until("both instances to accept connections", 30, || {
            infos.iter().all(|i| accepts(i.port))
        })
        .await;
        for i in &infos {
            let env = fs::read_to_string(dir.path().join(format!("env-{}", i.index))).unwrap();
            assert_eq!(env.trim(), format!("{} web green v2 {}", i.port, i.index));
            assert_eq!(i.log, dir.path().join(format!("state/logs/web/green-{}.log", i.index)));
            let log = fs::read_to_string(&i.log).unwrap();
            for line in [format!("out-{}", i.index), format!("err-{}", i.index)] {
                assert!(log.lines().any(|l| l == line), "{line} missing from {log}");
            }
            let marker = format!(
                "cutover: starting web green-{} (v2) on 127.0.0.1:{}: echo \"$PORT",
                i.index, i.port
            );
            assert!(log.contains(&marker), "{log}");
        }
        group.stop().await.unwrap();
        for i in group.instances() {
            assert_eq!((i.state, i.pid), (InstanceState::Stopped, None));
            assert!(!accepts(i.port), "port {} still accepts after stop", i.port);
        }
    }

    #[tokio::test]
    async fn process_killed_instance_is_restarted_on_its_port() {
        let dir = tempfile::tempdir().unwrap();
        let group = ProcessGroup::start(spec(dir.path(), HTTP, 2)).await.unwrap();
        let before = group.instances();
        wait_until("both instances to accept connections", 30, || {
            before.iter().all(|i| accepts(i.port))
        })
        .await;
        let old = leaders(&before);
        let mut changes = group.subscribe();
        changes.borrow_and_update();

        kill(Pid::from_raw(old[0].0 as i32), Signal::SIGKILL).unwrap();
        wait_until("instance 0 to be restarted", 30, || {
            let i = &group.instances()[0];
            i.state == InstanceState::Running && i.restarts == 1
        })
        .await;
        let after = group.instances();
        assert_ne!(after[0].pid, before[0].pid);
        assert_eq!(after[0].port, before[0].port);
        assert_eq!(after[0].last_exit.as_deref(), Some("killed by SIGKILL"));
        assert_eq!(after[1], before[1], "the other instance is untouched");
        assert!(changes.has_changed().unwrap(), "subscribers hear of the restart");
        assert!(!old[0].running());
        wait_until("the restarted instance to accept connections", 30, || {
            accepts(after[0].port)
        })
        .await;
        let log = fs::read_to_string(&after[0].log).unwrap();
        assert!(
            log.contains("killed by SIGKILL after") && log.contains("restarting in 100ms"),
            "{log}"
        );
        assert!(log.contains("cutover: restarting web green-0 (v2)"), "{log}");

        let now = leaders(&after);
        group.stop().await.unwrap();
        assert!(now.iter().chain(&old).all(|p| !p.running()));
    }

    #[tokio::test]
    async fn process_stop_terminates_whole_groups_including_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        // The leader's background child, and a child of a child: both must go with the group.
        let command = "sh -c 'sleep 1001 & echo $! > deep-$CUTOVER_INSTANCE; wait' & \
                       sleep 1002 & echo $! > bg-$CUTOVER_INSTANCE; exec sleep 1003";
        let group = ProcessGroup::start(spec(dir.path(), command, 2)).await.unwrap();
        let infos = group.instances();
        let mut pids = leaders(&infos);
        for n in 0..2 {
            pids.push(pid_file(dir.path().join(format!("bg-{n}"))).await);
            pids.push(pid_file(dir.path().join(format!("deep-{n}"))).await);
        }
        assert!(pids.iter().all(|p| p.running()));

        let started = Instant::now();
        group.stop().await.unwrap();
        // The grace period is 60 s: finishing well before it shows SIGTERM did the work.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stop took {:?}",
            started.elapsed()
        );
        for p in &pids {
            assert!(!p.running(), "{p:?} survived stop");
        }
        for i in &infos {
            assert_eq!(group_members(i.pgid.unwrap()), Vec::<u32>::new());
        }
        // Idempotent.
        group.stop().await.unwrap();
        assert!(group
            .instances()
            .iter()
            .all(|i| i.state == InstanceState::Stopped && i.pid.is_none()));
    }

    #[tokio::test]
    async fn process_stop_escalates_to_sigkill_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        // SIGTERM is ignored by the shell, its background child and the exec'd leader.
        let command = "trap '' TERM; sleep 1000 & echo $! > bg; exec sleep 1000";
        let mut spec = spec(dir.path(), command, 1);
        spec.grace = Duration::from_millis(500);
        let group = ProcessGroup::start(spec).await.unwrap();
        let mut pids = leaders(&group.instances());
        pids.push(pid_file(dir.path().join("bg")).await);

        let started = Instant::now();
        group.stop().await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "SIGKILL before the grace period"
        );
        assert!(pids.iter().all(|p| !p.running()), "{pids:?}");
    }

    #[tokio::test]
    async fn process_crashing_command_restarts_with_backoff_and_stops_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let group = ProcessGroup::start(spec(dir.path(), "echo run >> runs; exit 3", 1))
            .await
            .unwrap();
        wait_until("four restarts", 60, || group.instances()[0].restarts >= 4).await;
        // 100 + 200 + 400 + 800 ms of backoff before the fourth restart.
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "restarted too fast: {:?}",
            started.elapsed()
        );
        assert_eq!(group.instances()[0].last_exit.as_deref(), Some("exited with status 3"));
        let runs = fs::read_to_string(dir.path().join("runs")).unwrap();
        assert!(runs.lines().count() >= 4, "{runs}");

        let stopping = Instant::now();
        group.stop().await.unwrap();
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "stop took {:?}",
            stopping.elapsed()
        );
        assert_eq!(group.instances()[0].state, InstanceState::Stopped);
    }

    #[tokio::test]
    async fn process_quick_exits_make_a_crash_loop_with_the_last_output_kept() {
        let dir = tempfile::tempdir().unwrap();
        // Each run writes its number to stdout and stderr and fails as a missing command does.
        let command = "n=$(cat runs 2>/dev/null || echo 0); n=$((n + 1)); echo $n > runs; \
                       echo \"out $n\"; echo; echo \"err $n\" >&2; exit 127";
        let mut spec = spec(dir.path(), command, 1);
        spec.backoff.initial = Duration::from_millis(20);
        let group = ProcessGroup::start(spec).await.unwrap();
        assert!(!group.instances()[0].crash_looping());
        wait_until("a crash loop", 60, || group.instances()[0].crash_looping()).await;
        let i = group.instances()[0].clone();
        assert!(i.quick_exits >= CRASH_LOOP_EXITS, "{i:?}");
        assert_eq!(i.last_exit.as_deref(), Some("exited with status 127"));
        assert_eq!(i.last_exit_code, Some(127));
        // Only the lines of the run that exited last (one per exit so far), without cutover's
        // markers or blank lines.
        let n = i.quick_exits;
        assert_eq!(i.last_output, [format!("out {n}"), format!("err {n}")], "{i:?}");
        group.stop().await.unwrap();
    }

    #[tokio::test]
    async fn process_exits_after_a_longer_run_are_not_a_crash_loop() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), "echo up; sleep 0.3; kill -9 $$", 1);
        spec.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(20),
            reset_after: Duration::from_millis(100),
        };
        let group = ProcessGroup::start(spec).await.unwrap();
        wait_until("four exits", 60, || group.instances()[0].restarts >= 4).await;
        let i = group.instances()[0].clone();
        assert_eq!((i.quick_exits, i.crash_looping()), (0, false), "{i:?}");
        assert_eq!(i.last_exit.as_deref(), Some("killed by SIGKILL"));
        assert_eq!(i.last_exit_code, None);
        assert_eq!(i.last_output, ["up"]);
        group.stop().await.unwrap();
    }

    #[test]
    fn process_last_output_is_bounded_and_leaves_out_markers() {
        let marker = "=== 2026-01-02T03:04:05Z cutover: restarting web green-0 (v2) on 127.0.0.1:1: x";
        let mut text = format!("old line\n{marker}\n");
        for n in 1..=12 {
            text.push_str(&format!("line {n}\n"));
        }
        text.push_str(&format!("{}\n\x1b[31mred\tx\r\n\n", "é".repeat(300)));
        let lines = last_lines(&text, false);
        assert_eq!(lines.len(), OUTPUT_TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[8], format!("{}…", "é".repeat(OUTPUT_LINE_CHARS)));
        assert_eq!(lines[9], "\u{fffd}[31mred\tx");
        // A cut first line is left out; without any marker every line counts.
        assert_eq!(last_lines("ial line\nwhole\n", true), ["whole"]);
        assert_eq!(last_lines("a\nb\n", false), ["a", "b"]);
        assert_eq!(last_lines(&format!("a\n{marker}\n"), false), Vec::<String>::new());
        // Not a marker: the timestamp is missing, or the line is too short to hold one.
        assert_eq!(last_lines("=== cutover: x\n===\n", false), ["=== cutover: x", "==="]);

        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("big.log");
        assert_eq!(output_tail(&log), Vec::<String>::new(), "no log");
        let big: String = (0..5000).map(|n| format!("line {n}\n")).collect();
        fs::write(&log, big).unwrap();
        assert_eq!(output_tail(&log).last().map(String::as_str), Some("line 4999"));
        assert_eq!(output_tail(&log).len(), OUTPUT_TAIL_LINES);
    }

    #[tokio::test]
    async fn process_restart_moves_to_a_new_port_when_its_port_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), "exit 1", 1);
        spec.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            reset_after: Duration::from_secs(10),
        };
        let group = ProcessGroup::start(spec).await.unwrap();
        let old = group.instances()[0].port;
        wait_until("the first exit", 30, || group.instances()[0].last_exit.is_some()).await;
        // The command never listens; only the driver's own probe of the port (a bind held for
        // an instant before each restart) can make this bind fail, so retry it.
        let mut squatter = None;
        wait_until("binding the instance's port", 30, || {
            squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, old)).ok();
            squatter.is_some()
        })
        .await;
        wait_until("the instance to move", 30, || group.instances()[0].port != old).await;
        group.stop().await.unwrap();
    }

    #[tokio::test]
    async fn process_dropping_the_group_stops_its_instances() {
        let dir = tempfile::tempdir().unwrap();
        let group = ProcessGroup::start(spec(dir.path(), "exec sleep 1000", 1))
            .await
            .unwrap();
        let pid = leaders(&group.instances())[0];
        drop(group);
        wait_until("the dropped group's instance to stop", 30, || !pid.running()).await;
    }

    #[tokio::test]
    async fn process_adopts_running_instances_after_a_daemon_crash() {
        let dir = tempfile::tempdir().unwrap();
        let first = ProcessGroup::start(spec(dir.path(), HTTP, 2)).await.unwrap();
        let infos = first.instances();
        wait_until("both instances to accept connections", 30, || {
            infos.iter().all(|i| accepts(i.port))
        })
        .await;
        let old = leaders(&infos);
        // The daemon dies: nobody supervises the instances any more, and they keep running.
        let recorded = first.detach().await;
        let _reaper = Reaper(recorded.clone());
        assert_eq!(recorded, first_records(&infos));
        assert!(old.iter().all(|p| p.running()));

        let (second, report) = ProcessGroup::adopt(spec(dir.path(), HTTP, 2), recorded).await.unwrap();
        assert_eq!(
            report,
            AdoptReport {
                adopted: vec![0, 1],
                started: vec![],
                stopped: vec![]
            }
        );
        let adopted = second.instances();
        for (a, i) in adopted.iter().zip(&infos) {
            assert_eq!(
                (a.pid, a.port, a.state, a.adopted),
                (i.pid, i.port, InstanceState::Running, true)
            );
        }
        assert!(fs::read_to_string(&adopted[0].log)
            .unwrap()
            .contains("cutover: adopted pid"));

        // Supervised: an adopted instance that dies is restarted on its port.
        kill(Pid::from_raw(old[0].0 as i32), Signal::SIGKILL).unwrap();
        wait_until("the adopted instance to be restarted", 30, || {
            let i = &second.instances()[0];
            i.state == InstanceState::Running && i.restarts == 1
        })
        .await;
        let restarted = second.instances();
        assert_eq!(restarted[0].port, infos[0].port);
        assert!(!restarted[0].adopted);
        assert_eq!(
            restarted[0].last_exit.as_deref(),
            Some("exited (status unknown: started by an earlier cutover)")
        );
        wait_until("the restarted instance to accept connections", 30, || {
            accepts(infos[0].port)
        })
        .await;

        let new = leaders(&restarted);
        second.stop().await.unwrap();
        assert!(old.iter().chain(&new).all(|p| !p.running()));
        assert!(infos.iter().all(|i| !accepts(i.port)));
    }

    fn first_records(infos: &[InstanceInfo]) -> Vec<Recorded> {
        infos.iter().map(|i| i.recorded().unwrap()).collect()
    }

    /// Kills, when dropped, the instances a test left without supervisor (detached, or spawned by
    /// the test itself), so that a failing test does not leak processes. `classify` makes it a
    /// no-op once they are gone, even if their pids were reused by another test meanwhile.
    struct Reaper(Vec<Recorded>);

    impl Drop for Reaper {
        fn drop(&mut self) {
            for r in &self.0 {
                if !matches!(classify(r), Found::Gone) {
                    let _ = signal_group(r.pgid, Some(Signal::SIGKILL));
                }
            }
        }
    }

    /// A `sleep` in its own group that no driver started, and its record.
    fn spawn_sleep() -> (Child, Recorded) {
        let child = Command::new("sleep")
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let record = Recorded {
            index: 0,
            pid,
            pgid: pid,
            port: 1,
            start_time: Some(proc_stat(pid).unwrap().start_time),
        };
        (child, record)
    }

    #[tokio::test]
    async fn process_adoption_restarts_gone_instances_and_kills_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let command = "sleep 1000 & echo $! > bg-$CUTOVER_INSTANCE; exec sleep 1000";
        let first = ProcessGroup::start(spec(dir.path(), command, 3)).await.unwrap();
        let mut bg = Vec::new();
        for n in 0..3 {
            bg.push(pid_file(dir.path().join(format!("bg-{n}"))).await);
        }
        let old = leaders(&first.instances());
        let mut recorded = first.detach().await;
        let mut reaper = Reaper(recorded.clone());
        assert_eq!(recorded.len(), 3);

        // Instance 1: its whole group died while no daemon ran.
        signal_group(recorded[1].pgid, Some(Signal::SIGKILL)).unwrap();
        wait_until("instance 1's group to die", 30, || {
            group_members(recorded[1].pgid).is_empty()
        })
        .await;
        // Instance 2: only its leader died; its background child lives on.
        kill(Pid::from_raw(recorded[2].pid as i32), Signal::SIGKILL).unwrap();
        wait_until("instance 2's leader to die", 30, || !old[2].running()).await;
        assert!(bg[2].running());
        // A recorded instance no longer wanted (instances went down from 6 to 3).
        let (_extra, mut extra) = spawn_sleep();
        extra.index = 5;
        // A record whose pid now belongs to an unrelated process (another start time).
        let (mut stranger, mut reused) = spawn_sleep();
        reused.index = 4;
        reaper.0.extend([extra.clone(), reused.clone()]);
        reused.start_time = reused.start_time.map(|t| t + 1);
        let extra_seen = Seen::new(extra.pid);
        let stranger_seen = Seen::new(stranger.id());
        recorded.push(extra.clone());
        recorded.push(reused);

        let (second, report) = ProcessGroup::adopt(spec(dir.path(), command, 3), recorded.clone())
            .await
            .unwrap();
        assert_eq!(
            report,
            AdoptReport {
                adopted: vec![0],
                started: vec![1, 2],
                stopped: vec![extra]
            }
        );
        let infos = second.instances();
        assert_eq!(infos.len(), 3);
        assert_eq!(infos[0].pid, Some(recorded[0].pid));
        for (i, r) in infos.iter().zip(&recorded) {
            assert_eq!(i.port, r.port, "instance {} keeps its port", i.index);
            assert_eq!(i.state, InstanceState::Running);
        }
        assert!(!bg[2].running(), "leftover of instance 2 still runs");
        assert!(!extra_seen.running(), "unwanted instance still runs");
        assert!(
            stranger_seen.running(),
            "a process that merely reuses a recorded pid was touched"
        );
        assert!(
            bg[0].running() && old[0].running(),
            "the adopted instance was disturbed"
        );

        let new = leaders(&second.instances());
        second.stop().await.unwrap();
        assert!(new.iter().chain(&old).chain(&bg).all(|p| !p.running()));
        stranger.kill().unwrap();
        stranger.wait().unwrap();
    }

    #[tokio::test]
    async fn process_stop_recorded_stops_instances_of_an_earlier_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let command = "sleep 1000 & echo $! > bg-$CUTOVER_INSTANCE; exec sleep 1000";
        let first = ProcessGroup::start(spec(dir.path(), command, 2)).await.unwrap();
        let mut pids = leaders(&first.instances());
        for n in 0..2 {
            pids.push(pid_file(dir.path().join(format!("bg-{n}"))).await);
        }
        let recorded = first.detach().await;
        let _reaper = Reaper(recorded.clone());
        let grace = Duration::from_secs(60);
        assert_eq!(stop_recorded("web", Colour::Green, &recorded, grace).await.unwrap(), 2);
        assert!(pids.iter().all(|p| !p.running()), "{pids:?}");
        assert_eq!(stop_recorded("web", Colour::Green, &recorded, grace).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn process_errors_name_the_service_and_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = spec(&dir.path().join("missing"), "exec sleep 1000", 1);
        let e = ProcessGroup::start(bad.clone()).await.unwrap_err();
        assert!(matches!(e, DriverError::Workdir { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("service web (green): cannot run `exec sleep 1000` in "),
            "{e}"
        );
        assert!(!e.retryable());

        // The state directory is a file: no log directory can be created below it.
        fs::write(dir.path().join("state"), "").unwrap();
        bad = spec(dir.path(), "exec sleep 1000", 1);
        let e = ProcessGroup::start(bad).await.unwrap_err();
        assert!(matches!(e, DriverError::Log { .. }), "{e:?}");
        assert!(e.to_string().contains("green-0.log"), "{e}");
        assert!(e.to_string().contains("make the state directory writable"), "{e}");

        let e = ProcessGroup::start(spec(dir.path(), "true", 0)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "service web (green): `instances` is 0; it must be 1 to 64"
        );
    }

    #[test]
    fn process_backoff_doubles_up_to_its_maximum() {
        let b = Backoff::default();
        let ms = |n| b.delay(n).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(6), ms(7), ms(31), ms(u32::MAX)],
            [100, 200, 400, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn process_never_signals_its_own_group_or_special_ids() {
        assert_eq!(signal_group(0, None), Err(Errno::ESRCH));
        assert_eq!(signal_group(1, None), Err(Errno::ESRCH));
        assert_eq!(signal_group(getpgrp().as_raw() as u32, None), Err(Errno::ESRCH));
        assert_eq!(signal_group(u32::MAX, None), Err(Errno::ESRCH));
        let r = Recorded {
            index: 0,
            pid: 0,
            pgid: 0,
            port: 1,
            start_time: None,
        };
        assert!(matches!(classify(&r), Found::Gone));
    }

    #[test]
    fn process_stat_and_timestamps_parse() {
        let line = "4242 (we(ird) name) S 17 4242 4242 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 100 200";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_time: 987_654
            }
        );
        assert_eq!(parse_stat("1 (x) S 1"), None);
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
