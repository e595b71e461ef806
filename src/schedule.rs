//! The scheduled flush: the only module that knows tokio-cron-scheduler.
//!
//! The job is a thin wrapper around [`Flusher::flush`], which tests call directly.
//! tokio-cron-scheduler may start a run while the previous one is still going; the flusher's
//! own lock skips such a run ([`WhenBusy::Skip`]).

use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info};

use crate::config::ConfigError;
use crate::flush::{Flusher, WhenBusy};

/// The value of `--flush-cron` that turns the schedule off.
pub const CRON_OFF: &str = "off";

/// Checks a cron expression in the scheduler's dialect (six fields, seconds first).
pub fn validate_cron(expression: &str) -> Result<(), ConfigError> {
    if expression == CRON_OFF {
        return Ok(());
    }
    Job::new_async(expression, |_, _| Box::pin(async {})).map(|_| ()).map_err(|e| {
        ConfigError::new(
            "--flush-cron",
            "COUNTERSINK_FLUSH_CRON",
            format!(
                "{expression:?} is not a cron expression with seconds, e.g. \"*/10 * * * * *\" ({e:?}), or \"off\""
            ),
        )
    })
}

/// Starts the scheduled flush; `None` when the schedule is off.
pub async fn start(expression: &str, flusher: Flusher) -> anyhow::Result<Option<JobScheduler>> {
    if expression == CRON_OFF {
        info!("scheduled flush is off");
        return Ok(None);
    }
    let scheduler = JobScheduler::new().await?;
    let job = Job::new_async(expression, move |_, _| {
        let flusher = flusher.clone();
        Box::pin(async move {
            if let Err(e) = flusher.flush(WhenBusy::Skip).await {
                // Nothing is lost: the deltas stay in Redis for the next run.
                error!(error = %e, "scheduled flush failed");
            }
        })
    })?;
    scheduler.add(job).await?;
    scheduler.start().await?;
    info!(cron = expression, "scheduled flush started");
    Ok(Some(scheduler))
}
