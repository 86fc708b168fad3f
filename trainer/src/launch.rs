//! `forge launch`: starts data-parallel workers like torchrun. Each worker is this same
//! `forge` binary running the given subcommand with RANK, LOCAL_RANK, WORLD_SIZE,
//! LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (and OMP_NUM_THREADS = cores / workers
//! unless already set); their output goes line by line to a [`WorkerOutput`] (the binary
//! prefixes each line with the rank); when one fails the others are stopped and launch reports the rank and status;
//! Ctrl-C (SIGINT), SIGTERM or SIGHUP stops them all, and workers get SIGTERM if the
//! launcher itself dies.

use crate::error::{Result, TrainerError};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What to launch: the workers of this node and the forge command they run (`forge launch`'s
/// flags, parsed by the binary).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// One worker per GPU on this node; worker i uses cuda:<LOCAL_RANK>.
    pub gpus: Option<usize>,
    /// N CPU workers on this node (Gloo).
    pub nproc: Option<usize>,
    /// Number of nodes (machines) taking part (at least 1).
    pub nnodes: usize,
    /// This node's index, 0..nnodes (node 0 hosts the rendezvous).
    pub node_rank: usize,
    /// Address of node 0, reachable from every node (default 127.0.0.1 on one node).
    pub master_addr: Option<String>,
    /// TCP port on node 0 for the rendezvous (default on one node: a free port).
    pub master_port: Option<u16>,
    /// Seconds the other workers get to exit after a failure or Ctrl-C before being killed.
    pub grace_s: u64,
    /// The forge command each worker runs, e.g. `["train", "recipe.yaml"]`.
    pub command: Vec<String>,
    /// Rank 0 writes to the launcher's own stderr (on a terminal: its progress bar) instead
    /// of through [`WorkerOutput`]; its `error:` line is then not collected.
    pub rank0_inherits_stderr: bool,
}

/// Which of a worker's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where the workers' output goes, line by line (each line ends with `\n`); called from one
/// thread per worker stream.
pub trait WorkerOutput: Send + Sync {
    fn line(&self, rank: usize, stream: Stream, line: &[u8]);
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Set in each worker's environment: `cpu` under `--nproc` (a recipe's `target.device: auto`
/// then means the CPU, even on a machine with GPUs), `cuda` under `--gpus`.
pub const LAUNCH_DEVICE_VAR: &str = "FORGE_LAUNCH_DEVICE";

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGHUP, handler);
    }
}

fn bad(flag: &str, msg: String) -> TrainerError {
    TrainerError::Config(format!("forge launch {flag}: {msg}"))
}

/// A free TCP port on this machine (bind port 0, read it back, release it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| TrainerError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    let port = l.local_addr().map_err(|source| TrainerError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    Ok(port.port())
}

/// The resolved placement of this node's workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub nproc: usize,
    pub gpus: bool,
    pub world: usize,
    pub first_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchOptions {
    /// Checks the flags and fills the defaults; errors name the flag and the fix.
    pub fn plan(&self) -> Result<Plan> {
        let (nproc, gpus) = match (self.gpus, self.nproc) {
            (Some(_), Some(_)) => return Err(bad("--gpus/--nproc", "give one of them, not both".into())),
            (None, None) => {
                return Err(bad(
                    "--gpus/--nproc",
                    "say how many workers to start on this node: --gpus N (one per GPU) or --nproc N (CPU)".into(),
                ))
            }
            (Some(n), None) => (n, true),
            (None, Some(n)) => (n, false),
        };
        if nproc == 0 {
            return Err(bad(
                if gpus { "--gpus" } else { "--nproc" },
                "must be at least 1".into(),
            ));
        }
        if gpus {
            let have = if tch::Cuda::is_available() {
                tch::Cuda::device_count() as usize
            } else {
                0
            };
            if have < nproc {
                return Err(bad(
                    "--gpus",
                    format!("{nproc} GPU workers requested but this machine/build sees {have} CUDA device(s): use --nproc N for CPU workers"),
                ));
            }
        }
        if self.nnodes == 0 {
            return Err(bad("--nnodes", "must be at least 1".into()));
        }
        if self.node_rank >= self.nnodes {
            return Err(bad(
                "--node-rank",
                format!(
                    "{} is not below --nnodes {} (nodes are numbered 0..nnodes)",
                    self.node_rank, self.nnodes
                ),
            ));
        }
        let (master_addr, master_port) = if self.nnodes > 1 {
            let addr = self.master_addr.clone().ok_or_else(|| {
                bad(
                    "--master-addr",
                    "is required with --nnodes > 1: the address of node 0, reachable from every node".into(),
                )
            })?;
            let port = self.master_port.ok_or_else(|| {
                bad(
                    "--master-port",
                    "is required with --nnodes > 1: a free TCP port on node 0, the same on every node".into(),
                )
            })?;
            (addr, port)
        } else {
            let addr = self.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into());
            let port = match self.master_port {
                Some(p) => p,
                None => free_port()?,
            };
            (addr, port)
        };
        if self.command.is_empty() {
            return Err(bad(
                "--",
                "give the forge command to run after --, e.g. `forge launch --nproc 2 -- train recipe.yaml`".into(),
            ));
        }
        Ok(Plan {
            nproc,
            gpus,
            world: self.nnodes * nproc,
            first_rank: self.node_rank * nproc,
            master_addr,
            master_port,
        })
    }
}

/// Each worker's first `error: ...` line on stderr, with its rank, in the order seen.
type ErrorLines = std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>;

/// Hands `from` line by line to `output`; on stderr, the worker's first line starting with
/// `error:` is also kept in the shared list.
fn pump(
    from: impl Read + Send + 'static,
    rank: usize,
    stream: Stream,
    output: std::sync::Arc<dyn WorkerOutput>,
    errors: ErrorLines,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    if stream == Stream::Stderr && line.starts_with(b"error:") {
                        if let Ok(mut e) = errors.lock() {
                            if !e.iter().any(|(r, _)| *r == rank) {
                                let text = String::from_utf8_lossy(&line[6..]).trim().chars().take(300).collect();
                                e.push((rank, text));
                            }
                        }
                    }
                    output.line(rank, stream, &line);
                }
            }
        }
    })
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    }
}

/// A worker: its rank, pid, and its exit status once its waiter thread reported it.
struct Worker {
    rank: usize,
    pid: u32,
    status: Option<ExitStatus>,
}

type Exit = (usize, std::io::Result<ExitStatus>);

/// Records a waiter thread's report.
fn record(workers: &mut [Worker], (rank, status): &Exit) {
    if let Some(w) = workers.iter_mut().find(|w| w.rank == *rank) {
        // a worker that could not be waited for counts as gone (nothing more can be done)
        w.status = Some(match status {
            Ok(s) => *s,
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
        });
    }
}

/// Asks every still-running worker to stop (SIGTERM), then kills those still alive after
/// `grace`; returns when every waiter thread has reported.
fn stop_all(workers: &mut [Worker], exits: &std::sync::mpsc::Receiver<Exit>, grace: Duration) {
    let signal_running = |workers: &[Worker], sig: libc::c_int| {
        for w in workers.iter().filter(|w| w.status.is_none()) {
            // SAFETY: signalling a child we spawned whose waiter has not reaped it yet.
            unsafe {
                libc::kill(w.pid as libc::pid_t, sig);
            }
        }
    };
    signal_running(workers, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut killed = false;
    while workers.iter().any(|w| w.status.is_none()) {
        let wait = if killed {
            Duration::from_secs(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match exits.recv_timeout(wait) {
            Ok(e) => record(workers, &e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !killed => {
                signal_running(workers, libc::SIGKILL);
                killed = true;
            }
            Err(_) => return,
        }
    }
}

/// Runs the workers of `plan` (from [`LaunchOptions::plan`]) to completion, their output
/// going to `output`. Ok when all exit 0; otherwise an error naming the first rank whose
/// failure the launcher saw and its status, plus each worker's first `error:` line (when one
/// rank fails, the others' collectives fail moments later and may exit first; the errors
/// together name the cause), or the interruption. Installs handlers for SIGINT, SIGTERM and
/// SIGHUP that stop the workers.
pub fn run(args: &LaunchOptions, plan: &Plan, output: std::sync::Arc<dyn WorkerOutput>) -> Result<()> {
    let exe = std::env::current_exe().map_err(|source| TrainerError::Io {
        path: "/proc/self/exe".into(),
        source,
    })?;
    install_signal_handlers();
    // like torchrun: workers share this node's cores instead of each taking all of them
    let threads = std::env::var("OMP_NUM_THREADS")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / plan.nproc).max(1).to_string()
        });
    let (tx, exits) = std::sync::mpsc::channel::<Exit>();
    let error_lines: ErrorLines = Default::default();
    let mut workers: Vec<Worker> = Vec::new();
    let mut pumps = Vec::new();
    let mut spawn_error = None;
    for local in 0..plan.nproc {
        let rank = plan.first_rank + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", plan.world.to_string())
            .env("LOCAL_WORLD_SIZE", plan.nproc.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", plan.master_port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .env(LAUNCH_DEVICE_VAR, if plan.gpus { "cuda" } else { "cpu" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // rank 0 keeps the terminal for its progress bar; other output is prefixed
        if rank == 0 && args.rank0_inherits_stderr {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(Stdio::piped());
        }
        // a worker gets SIGTERM when the launcher dies, even by SIGKILL (no orphans). A
        // launcher that dies between fork and the prctl sends no signal: the child sees that
        // it has been re-parented and exits before it execs.
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: prctl, getppid and _exit are async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != launcher {
                    libc::_exit(128 + libc::SIGTERM);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                spawn_error = Some(TrainerError::Io {
                    path: exe.clone(),
                    source,
                });
                break;
            }
        };
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, rank, Stream::Stdout, output.clone(), error_lines.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, rank, Stream::Stderr, output.clone(), error_lines.clone()));
        }
        workers.push(Worker {
            rank,
            pid: child.id(),
            status: None,
        });
        let tx = tx.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((rank, status));
        });
    }
    drop(tx);
    let mut failure: Option<String> = None;
    if spawn_error.is_none() {
        while workers.iter().any(|w| w.status.is_none()) {
            if STOP.load(Ordering::SeqCst) {
                failure = Some("interrupted: stopped all workers".into());
                break;
            }
            match exits.recv_timeout(Duration::from_millis(50)) {
                Ok(e) => {
                    record(&mut workers, &e);
                    let (rank, status) = e;
                    match status {
                        Ok(s) if s.success() => {}
                        Ok(s) => failure = Some(format!("rank {rank} exited with {}", describe(&s))),
                        Err(err) => failure = Some(format!("rank {rank}: cannot wait for the worker: {err}")),
                    }
                    if failure.is_some() {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    let stopped = workers.iter().filter(|w| w.status.is_none()).count();
    stop_all(&mut workers, &exits, Duration::from_secs(args.grace_s));
    for p in pumps {
        let _ = p.join();
    }
    let errors = error_lines.lock().map(|e| e.clone()).unwrap_or_default();
    if let (Some(f), false) = (failure.as_mut(), errors.is_empty()) {
        // when one rank fails, the others' collectives fail moments later and one of them may
        // exit (and even print) first: every rank's error names the cause among them
        let each: Vec<String> = errors
            .iter()
            .map(|(rank, line)| format!("rank {rank}: {line}"))
            .collect();
        f.push_str(&format!(" (errors: {})", each.join("; ")));
    }
    if let Some(e) = spawn_error {
        return Err(e);
    }
    match failure {
        None => Ok(()),
        Some(f) => Err(TrainerError::Launch(if stopped > 0 {
            format!("{f}; stopped the other {stopped} worker(s)")
        } else {
            f
        })),
    }
}
