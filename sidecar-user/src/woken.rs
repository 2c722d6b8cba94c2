//! Futures polled only when they asked to be: a branch of a `select!` or `join!`
//! that rarely has work (a drain, a timer, the idle direction of a copy) is not
//! polled each time its task wakes for another branch. Polling such a branch is not
//! free: a drain's token takes a lock shared by every connection, a timer reads the
//! clock, an HBONE stream locks its connection's state; on the data path that was
//! paid for every message.
//!
//! The task's waker is registered on every poll that finds the branch not woken: a
//! wake takes the registered waker, and one that races with the poll before it (its
//! flag set before the poll cleared it, its waker taken after the poll registered
//! again) leaves nothing registered, so a poll that trusted an earlier registration
//! would lose every wake after it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `inner`, polled only on its first poll and after it woke its waker.
    pub struct Woken<F> {
        #[pin]
        inner: F,
        flag: Arc<Flag>,
        // `flag` as a waker, made once.
        waker: Waker,
    }
}

/// Set by the inner future's waker; passes the wake on to the task.
#[derive(Default)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Wraps `inner` so that it is polled only when it has work.
pub fn woken<F: Future>(inner: F) -> Woken<F> {
    let flag = Arc::new(Flag {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let waker = Waker::from(flag.clone());
    Woken { inner, flag, waker }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut registered = false;
        if !this.flag.woken.load(Ordering::Acquire) {
            // Registering the same waker again is two uncontended atomic operations,
            // far less than polling the branch.
            this.flag.task.register(cx.waker());
            registered = true;
            // A wake before the registration set the flag: do not miss it.
            if !this.flag.woken.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        // Woken: unless just done, register again (the wake took the registered
        // waker), then let the inner future see what woke it (a wake from here on
        // is seen by the next poll of the task).
        this.flag.woken.store(false, Ordering::Release);
        if !registered {
            this.flag.task.register(cx.waker());
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering::Relaxed},
        time::Duration,
    };

    use super::*;

    /// Counts its polls; ready once `ready` is set (and it was woken).
    struct Probe<'a> {
        polls: &'a AtomicUsize,
        ready: &'a AtomicBool,
        waker: &'a std::sync::Mutex<Option<Waker>>,
    }

    impl Future for Probe<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Relaxed);
            if self.ready.load(Relaxed) {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_branch_is_polled_only_after_its_own_wake() {
        let (polls, ready, waker) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None),
        );
        let probe = woken(Probe {
            polls: &polls,
            ready: &ready,
            waker: &waker,
        });
        tokio::pin!(probe);
        let mut ticks = 0;
        loop {
            tokio::select! {
                () = &mut probe => break,
                () = tokio::time::sleep(Duration::from_millis(1)) => {
                    ticks += 1;
                    if ticks == 20 {
                        ready.store(true, Relaxed);
                        let waker = waker.lock().expect("lock").take().expect("a waker was kept");
                        waker.wake();
                    }
                }
            }
        }
        // Once at the start, once after its wake: not once per tick of the other
        // branch.
        assert_eq!(polls.load(Relaxed), 2, "polled on other branches' wakes");
        assert_eq!(ticks, 20);
    }

    #[tokio::test]
    async fn a_wake_from_another_task_reaches_the_branch() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let rx = woken(rx);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(7);
        });
        // The deadline is checked first: a branch that only gets polled when the
        // task wakes for another reason must not pass.
        let got = tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(5)) => panic!("the wake was lost"),
            got = rx => got.expect("sent"),
        };
        assert_eq!(got, 7);
    }

    /// Counts the wakes of a task.
    #[derive(Default)]
    struct TaskWakes(AtomicUsize);

    impl Wake for TaskWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// A wake runs in two steps (flag set, then the registered waker taken and
    /// woken); here another thread's wake straddles a poll of the task, in the order
    /// that left no waker registered.
    #[test]
    fn a_wake_straddling_a_poll_does_not_lose_the_next_wake() {
        let task = Arc::new(TaskWakes::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let (polls, ready, waker) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None),
        );
        let probe = woken(Probe {
            polls: &polls,
            ready: &ready,
            waker: &waker,
        });
        let flag = probe.flag.clone();
        let mut probe = std::pin::pin!(probe);
        assert!(probe.as_mut().poll(&mut cx).is_pending());
        // Another thread's wake sets the flag ...
        flag.woken.store(true, Ordering::Release);
        // ... the task, polled meanwhile, clears it and registers ...
        assert!(probe.as_mut().poll(&mut cx).is_pending());
        // ... then that wake takes the waker and wakes the task,
        flag.task.wake();
        assert_eq!(task.0.load(Relaxed), 1);
        // whose poll finds nothing new.
        assert!(probe.as_mut().poll(&mut cx).is_pending());
        // The branch's next wake must still reach the task.
        ready.store(true, Relaxed);
        waker
            .lock()
            .expect("lock")
            .take()
            .expect("a waker was kept")
            .wake();
        assert_eq!(
            task.0.load(Relaxed),
            2,
            "the task was not woken: the wake was lost"
        );
        assert!(probe.as_mut().poll(&mut cx).is_ready());
    }
}
