//! Scheduled work: the only module that knows tokio-cron-scheduler.
//!
//! Jobs are thin wrappers around plain async functions that tests call directly:
//! [`Flusher::flush`] and [`Reconciler::reconcile_all`]. tokio-cron-scheduler may start a run
//! while the previous one is still going; the flusher's own lock skips such a flush
//! ([`WhenBusy::Skip`]), and a reconcile run that finds one running is skipped here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info};

use crate::config::{ConfigError, Setting};
use crate::flush::{Flusher, WhenBusy};
use crate::reconcile::Reconciler;

/// The value of a cron setting that turns that schedule off.
pub const CRON_OFF: &str = "off";

/// Checks a cron expression in the scheduler's dialect (six fields, seconds first).
pub fn validate_cron(expression: &str, setting: Setting) -> Result<(), ConfigError> {
    if expression == CRON_OFF {
        return Ok(());
    }
    Job::new_async(expression, |_, _| Box::pin(async {})).map(|_| ()).map_err(|e| {
        ConfigError::new(
            setting,
            format!(
                "{expression:?} is not a cron expression with seconds, e.g. \"*/10 * * * * *\" ({e:?}), or \"off\""
            ),
        )
    })
}

/// What to schedule.
pub struct Schedules {
    /// `--flush-cron`.
    pub flush_cron: String,
    /// `--reconcile-cron`.
    pub reconcile_cron: String,
    /// `--reconcile-rate`, users per second.
    pub reconcile_rate: u32,
}

/// Starts the scheduled jobs; `None` when every schedule is off.
pub async fn start(
    schedules: &Schedules,
    flusher: Flusher,
    reconciler: Reconciler,
) -> anyhow::Result<Option<JobScheduler>> {
    if schedules.flush_cron == CRON_OFF && schedules.reconcile_cron == CRON_OFF {
        info!("no scheduled jobs: flush and reconcile run on demand only");
        return Ok(None);
    }
    let scheduler = JobScheduler::new().await?;
    if schedules.flush_cron != CRON_OFF {
        let job = Job::new_async(schedules.flush_cron.as_str(), move |_, _| {
            let flusher = flusher.clone();
            Box::pin(async move {
                if let Err(e) = flusher.flush(WhenBusy::Skip).await {
                    // Nothing is lost: the deltas stay in Redis for the next run.
                    error!(error = %e, "scheduled flush failed");
                }
            })
        })?;
        scheduler.add(job).await?;
        info!(cron = schedules.flush_cron, "scheduled flush");
    }
    if schedules.reconcile_cron != CRON_OFF {
        let running = Arc::new(AtomicBool::new(false));
        let rate = schedules.reconcile_rate;
        let job = Job::new_async(schedules.reconcile_cron.as_str(), move |_, _| {
            let (reconciler, running) = (reconciler.clone(), running.clone());
            Box::pin(async move {
                if running.swap(true, Ordering::SeqCst) {
                    info!("scheduled reconcile skipped: the last one is still running");
                    return;
                }
                // Its report is logged by the reconciler: drift should be zero.
                if let Err(e) = reconciler.reconcile_all(rate, |_| {}).await {
                    error!(error = %e, "scheduled reconcile failed");
                }
                running.store(false, Ordering::SeqCst);
            })
        })?;
        scheduler.add(job).await?;
        info!(cron = schedules.reconcile_cron, rate, "scheduled reconcile");
    }
    scheduler.start().await?;
    Ok(Some(scheduler))
}
