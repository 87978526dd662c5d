//! A deterministic single-threaded executor with virtual time.
//!
//! Tasks run in FIFO order of their wake-ups; when no task is ready, virtual time jumps to
//! the earliest timer. Nothing reads the real clock or depends on thread scheduling, so
//! the same inputs give the same schedule, bit for bit. Each task may belong to a node, so
//! a crash can drop every task of that node at once (losing its in-memory state, like a
//! SIGKILL).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bdr_node::env::BoxFuture;
use bdr_protocol::ids::NodeId;
use futures::task::ArcWake;

type TaskId = u64;

struct Task {
    owner: Option<NodeId>,
    future: Mutex<Option<BoxFuture<'static, ()>>>,
}

struct TaskWaker {
    id: TaskId,
    ready: Arc<Mutex<VecDeque<TaskId>>>,
}

impl ArcWake for TaskWaker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.lock().expect("not poisoned").push_back(arc_self.id);
    }
}

#[derive(Default)]
struct Timers {
    /// (deadline, sequence) -> waker; the sequence keeps equal deadlines in order.
    pending: BTreeMap<(u64, u64), Waker>,
    next_sequence: u64,
}

/// The executor; cheap to clone (shared state).
#[derive(Clone)]
pub struct Executor {
    ready: Arc<Mutex<VecDeque<TaskId>>>,
    tasks: Arc<Mutex<BTreeMap<TaskId, Arc<Task>>>>,
    timers: Arc<Mutex<Timers>>,
    now_ms: Arc<AtomicU64>,
    next_task: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
}

impl Default for Executor {
    fn default() -> Self {
        Executor::new(0)
    }
}

impl Executor {
    pub fn new(start_ms: u64) -> Executor {
        Executor {
            ready: Arc::new(Mutex::new(VecDeque::new())),
            tasks: Arc::new(Mutex::new(BTreeMap::new())),
            timers: Arc::new(Mutex::new(Timers::default())),
            now_ms: Arc::new(AtomicU64::new(start_ms)),
            next_task: Arc::new(AtomicU64::new(0)),
            polls: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Task polls so far (a measure of simulated work).
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    pub fn spawn(&self, owner: Option<NodeId>, future: BoxFuture<'static, ()>) {
        let id = self.next_task.fetch_add(1, Ordering::Relaxed);
        let task = Arc::new(Task {
            owner,
            future: Mutex::new(Some(future)),
        });
        self.tasks.lock().expect("not poisoned").insert(id, task);
        self.ready.lock().expect("not poisoned").push_back(id);
    }

    /// Drops every task owned by `node` (its futures, and all state they hold).
    pub fn kill_node_tasks(&self, node: &NodeId) {
        let doomed: Vec<Arc<Task>> = {
            let mut tasks = self.tasks.lock().expect("not poisoned");
            let ids: Vec<TaskId> = tasks
                .iter()
                .filter(|(_, task)| task.owner.as_ref() == Some(node))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| tasks.remove(&id)).collect()
        };
        // Drop the futures outside the lock: their destructors may wake other tasks.
        for task in doomed {
            let future = task.future.lock().expect("not poisoned").take();
            drop(future);
        }
    }

    pub fn sleep(&self, duration_ms: u64) -> Sleep {
        Sleep {
            deadline_ms: self.now_ms().saturating_add(duration_ms),
            registered: None,
            executor: self.clone(),
        }
    }

    /// Runs until virtual time reaches `until_ms` or nothing is left to do.
    pub fn run_until(&self, until_ms: u64) {
        loop {
            let next = self.ready.lock().expect("not poisoned").pop_front();
            match next {
                Some(id) => self.poll_task(id),
                None => {
                    let timer = {
                        let mut timers = self.timers.lock().expect("not poisoned");
                        match timers.pending.first_key_value() {
                            Some((&(deadline, _), _)) if deadline <= until_ms => timers.pending.pop_first(),
                            _ => None,
                        }
                    };
                    match timer {
                        Some(((deadline, _), waker)) => {
                            if deadline > self.now_ms() {
                                self.now_ms.store(deadline, Ordering::Relaxed);
                            }
                            waker.wake();
                        }
                        None => {
                            self.now_ms.store(until_ms.max(self.now_ms()), Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn poll_task(&self, id: TaskId) {
        let task = match self.tasks.lock().expect("not poisoned").get(&id) {
            Some(task) => Arc::clone(task),
            None => return,
        };
        let mut slot = task.future.lock().expect("not poisoned");
        let Some(future) = slot.as_mut() else { return };
        let waker = futures::task::waker(Arc::new(TaskWaker {
            id,
            ready: Arc::clone(&self.ready),
        }));
        self.polls.fetch_add(1, Ordering::Relaxed);
        let mut context = Context::from_waker(&waker);
        if future.as_mut().poll(&mut context).is_ready() {
            slot.take();
            drop(slot);
            self.tasks.lock().expect("not poisoned").remove(&id);
        }
    }

    /// Number of live tasks (for reports).
    pub fn task_count(&self) -> usize {
        self.tasks.lock().expect("not poisoned").len()
    }

    /// Owners of live tasks (for reports).
    pub fn owners(&self) -> BTreeSet<NodeId> {
        self.tasks
            .lock()
            .expect("not poisoned")
            .values()
            .filter_map(|task| task.owner)
            .collect()
    }
}

/// Resolves once virtual time reaches its deadline.
pub struct Sleep {
    deadline_ms: u64,
    /// The timer's key once registered.
    registered: Option<(u64, u64)>,
    executor: Executor,
}

impl Drop for Sleep {
    /// A sleep dropped early (a request's timeout once its answer came) takes its timer
    /// with it: left behind, the timer would wake its task for nothing, and most tasks
    /// that send requests are long loops whose every poll walks all they await.
    fn drop(&mut self) {
        if let Some(key) = self.registered.take() {
            self.executor.timers.lock().expect("not poisoned").pending.remove(&key);
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.executor.now_ms() >= self.deadline_ms {
            return Poll::Ready(());
        }
        if self.registered.is_none() {
            let mut timers = self.executor.timers.lock().expect("not poisoned");
            let key = (self.deadline_ms, timers.next_sequence);
            timers.next_sequence += 1;
            timers.pending.insert(key, context.waker().clone());
            drop(timers);
            self.registered = Some(key);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_virtual_time_order_without_waiting() {
        let executor = Executor::new(1000);
        let log = Arc::new(Mutex::new(Vec::new()));
        for (delay, label) in [(300u64, "c"), (100, "a"), (200, "b"), (100, "a2")] {
            let (executor2, log) = (executor.clone(), Arc::clone(&log));
            executor.spawn(
                None,
                Box::pin(async move {
                    executor2.sleep(delay).await;
                    log.lock().unwrap().push((executor2.now_ms(), label));
                }),
            );
        }
        let started = std::time::Instant::now();
        executor.run_until(10_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            *log.lock().unwrap(),
            vec![(1100, "a"), (1100, "a2"), (1200, "b"), (1300, "c")]
        );
        assert_eq!(executor.now_ms(), 10_000);
    }

    #[test]
    fn a_sleep_dropped_early_takes_its_timer_and_wakes_nothing_later() {
        let executor = Executor::new(0);
        let executor2 = executor.clone();
        executor.spawn(
            None,
            Box::pin(async move {
                // Like a request: an answer (the short sleep) beats its timeout.
                for _ in 0..5 {
                    futures::future::select(executor2.sleep(10), executor2.sleep(1_000)).await;
                }
                executor2.sleep(5_000).await;
            }),
        );
        executor.run_until(100);
        assert_eq!(
            executor.timers.lock().unwrap().pending.len(),
            1,
            "only the last sleep is pending"
        );
        executor.run_until(10_000);
        // The first poll, one per short sleep, one for the last: no timeout woke the task.
        assert_eq!(executor.polls(), 7);
        assert_eq!(executor.task_count(), 0);
    }

    #[test]
    fn killing_a_node_drops_its_tasks_only() {
        let executor = Executor::new(0);
        let counter = Arc::new(AtomicU64::new(0));
        for owner in [NodeId([1; 32]), NodeId([2; 32])] {
            let (executor2, counter) = (executor.clone(), Arc::clone(&counter));
            executor.spawn(
                Some(owner),
                Box::pin(async move {
                    loop {
                        executor2.sleep(10).await;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }),
            );
        }
        executor.run_until(100);
        assert_eq!(counter.load(Ordering::Relaxed), 20);
        executor.kill_node_tasks(&NodeId([1; 32]));
        executor.run_until(200);
        assert_eq!(counter.load(Ordering::Relaxed), 30);
        assert_eq!(executor.owners(), BTreeSet::from([NodeId([2; 32])]));
    }
}
