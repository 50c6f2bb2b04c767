//! GPU health classification: pure functions and a small per-GPU state machine.
//!
//! XID classes are the fleet's one table, [`flotilla_contract::xid`]. Application XIDs never
//! condemn a GPU; a Failed GPU stays Failed until validation passes or an admin clears it (the
//! NVIDIA device plugin never heals, which operators complain about; Flotilla does).

use serde::{Deserialize, Serialize};

pub use flotilla_contract::xid::{XidClass, classify_xid};

/// Health of one GPU, ordered by severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// Fine to schedule.
    Healthy,
    /// Usable; drain and validate.
    Degraded,
    /// Not usable until validated or cleared.
    Failed,
}

impl Health {
    /// Value of the `flotilla_gpu_health_state` gauge (0 healthy, 1 degraded, 2 failed).
    pub fn gauge_value(self) -> f64 {
        match self {
            Health::Healthy => 0.0,
            Health::Degraded => 1.0,
            Health::Failed => 2.0,
        }
    }
}

/// A fault observed on a GPU, from the backend's event loop or derived from samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// An XID error.
    Xid(u32),
    /// A double-bit (uncorrectable) ECC error.
    DoubleBitEcc,
    /// Corrected ECC errors above the storm threshold within one sample interval.
    SingleBitEccStorm,
    /// The GPU stopped answering (fell off the bus).
    GpuLost,
    /// At or above the slowdown temperature.
    Overheating,
    /// Pages pending retirement or a row-remap failure.
    MemoryWear,
    /// The operator found its steps persistently slower than its gang's (a straggler).
    SlowSteps,
}

impl Fault {
    /// Short machine-readable reason used in events and conditions.
    pub fn reason(self) -> String {
        match self {
            Fault::Xid(xid) => format!("Xid{xid}"),
            Fault::DoubleBitEcc => "DoubleBitEcc".to_owned(),
            Fault::SingleBitEccStorm => "SingleBitEccStorm".to_owned(),
            Fault::GpuLost => "GpuLost".to_owned(),
            Fault::Overheating => "Overheating".to_owned(),
            Fault::MemoryWear => "MemoryWear".to_owned(),
            Fault::SlowSteps => "SlowSteps".to_owned(),
        }
    }

    /// The health this fault alone implies (`Healthy` means "no verdict on the GPU").
    pub fn implied_health(self) -> Health {
        match self {
            Fault::Xid(xid) => match classify_xid(xid) {
                XidClass::Application => Health::Healthy,
                XidClass::Degraded => Health::Degraded,
                XidClass::HardwareFatal | XidClass::ResetRequired | XidClass::Unknown => {
                    Health::Failed
                }
            },
            Fault::DoubleBitEcc | Fault::GpuLost => Health::Failed,
            Fault::SingleBitEccStorm
            | Fault::Overheating
            | Fault::MemoryWear
            | Fault::SlowSteps => Health::Degraded,
        }
    }

    fn message(self) -> String {
        match self {
            Fault::Xid(xid) => match classify_xid(xid) {
                XidClass::Application => {
                    format!("XID {xid} is an application error; GPU unaffected")
                }
                XidClass::HardwareFatal => format!("XID {xid} is a fatal hardware error"),
                XidClass::ResetRequired => format!("XID {xid} requires a GPU reset or reboot"),
                XidClass::Degraded => format!("XID {xid} signals memory wear; drain and validate"),
                XidClass::Unknown => {
                    format!("XID {xid} is not in the known table; failing it to be safe")
                }
            },
            Fault::DoubleBitEcc => "double-bit ECC error".to_owned(),
            Fault::SingleBitEccStorm => "single-bit ECC error rate above threshold".to_owned(),
            Fault::GpuLost => "GPU lost: it no longer answers NVML".to_owned(),
            Fault::Overheating => "temperature at or above the slowdown threshold".to_owned(),
            Fault::MemoryWear => "pages pending retirement or row-remap failure".to_owned(),
            Fault::SlowSteps => "steps slower than its gang's; validate before reuse".to_owned(),
        }
    }
}

/// The health of one GPU with the reason for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// The classification.
    pub health: Health,
    /// Short reason ("Xid79", "Validated", …); empty when healthy from the start.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
    /// Last XID seen (0 if none).
    pub last_xid: u32,
}

impl HealthStatus {
    /// A GPU with nothing against it.
    pub fn healthy() -> Self {
        Self { health: Health::Healthy, reason: String::new(), message: String::new(), last_xid: 0 }
    }
}

/// Per-GPU health state machine.
///
/// Severity only rises on faults. It falls only through [`GpuHealthTracker::validation_passed`],
/// [`GpuHealthTracker::admin_clear`], or — for heat alone — when the GPU cools down.
#[derive(Clone, Debug)]
pub struct GpuHealthTracker {
    status: HealthStatus,
}

impl Default for GpuHealthTracker {
    fn default() -> Self {
        Self { status: HealthStatus::healthy() }
    }
}

impl GpuHealthTracker {
    /// Starts from a known status (e.g. restored after a restart).
    pub fn from_status(status: HealthStatus) -> Self {
        Self { status }
    }

    /// Current status.
    pub fn status(&self) -> &HealthStatus {
        &self.status
    }

    /// Applies a fault; returns whether the health level changed.
    pub fn apply(&mut self, fault: Fault) -> bool {
        if let Fault::Xid(xid) = fault {
            self.status.last_xid = xid;
        }
        let implied = fault.implied_health();
        if implied > self.status.health {
            self.status.health = implied;
            self.status.reason = fault.reason();
            self.status.message = fault.message();
            return true;
        }
        false
    }

    /// The operator suspects the GPU (its steps are slower than its gang's): Degraded with
    /// `evidence` as the message, unless it is already Degraded or worse. Returns whether the
    /// health changed.
    pub fn suspect(&mut self, evidence: &str) -> bool {
        let changed = self.apply(Fault::SlowSteps);
        if changed && !evidence.is_empty() {
            self.status.message = evidence.to_owned();
        }
        changed
    }

    /// The GPU cooled below its slowdown threshold: a Degraded verdict that was only about heat
    /// lifts by itself. Returns whether the health changed.
    pub fn cooled_down(&mut self) -> bool {
        if self.status.health == Health::Degraded
            && self.status.reason == Fault::Overheating.reason()
        {
            self.reset("CooledDown", "temperature back below the slowdown threshold");
            return true;
        }
        false
    }

    /// Validation passed: the GPU is Healthy again. Returns whether the health changed.
    pub fn validation_passed(&mut self) -> bool {
        let changed = self.status.health != Health::Healthy;
        if changed {
            self.reset("Validated", "validation passed");
        }
        changed
    }

    /// An admin cleared the GPU. Returns whether the health changed.
    pub fn admin_clear(&mut self) -> bool {
        let changed = self.status.health != Health::Healthy;
        if changed {
            self.reset("AdminCleared", "cleared by an administrator");
        }
        changed
    }

    fn reset(&mut self, reason: &str, message: &str) {
        self.status.health = Health::Healthy;
        self.status.reason = reason.to_owned();
        self.status.message = message.to_owned();
    }
}

/// Corrected ECC errors within one sample interval above which we call it a storm.
pub const ECC_STORM_THRESHOLD: u64 = 100;

/// The parts of a telemetry sample that can imply a fault.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleSignals {
    /// Core temperature, °C.
    pub temperature_c: f32,
    /// Slowdown threshold, °C (0 when unknown: no heat verdict).
    pub slowdown_temperature_c: f32,
    /// Volatile corrected ECC count.
    pub ecc_corrected: u64,
    /// Pages pending retirement.
    pub retired_pages_pending: bool,
    /// Row-remap failure.
    pub row_remap_failure: bool,
}

/// Faults implied by a sample compared with the previous one of the same GPU.
pub fn faults_from_sample(previous: Option<&SampleSignals>, now: &SampleSignals) -> Vec<Fault> {
    let mut faults = Vec::new();
    if now.slowdown_temperature_c > 0.0 && now.temperature_c >= now.slowdown_temperature_c {
        faults.push(Fault::Overheating);
    }
    if let Some(prev) = previous
        && now.ecc_corrected.saturating_sub(prev.ecc_corrected) > ECC_STORM_THRESHOLD
    {
        faults.push(Fault::SingleBitEccStorm);
    }
    if now.retired_pages_pending || now.row_remap_failure {
        faults.push(Fault::MemoryWear);
    }
    faults
}

/// Whether a sample shows the GPU has cooled down enough (5 °C of hysteresis) to lift a heat verdict.
pub fn has_cooled(now: &SampleSignals) -> bool {
    now.slowdown_temperature_c > 0.0 && now.temperature_c < now.slowdown_temperature_c - 5.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_xids_never_condemn_a_gpu() {
        for xid in [13, 31, 43, 45, 68, 109] {
            let mut gpu = GpuHealthTracker::default();
            assert!(!gpu.apply(Fault::Xid(xid)), "xid {xid} changed health");
            assert_eq!(gpu.status().health, Health::Healthy, "xid {xid}");
            assert_eq!(gpu.status().last_xid, xid);
        }
    }

    #[test]
    fn hardware_and_unknown_xids_fail_the_gpu() {
        for xid in [48, 62, 64, 74, 79, 95, 119, 120, 140, 44, 61, 65, 154, 9999] {
            let mut gpu = GpuHealthTracker::default();
            assert!(gpu.apply(Fault::Xid(xid)));
            assert_eq!(gpu.status().health, Health::Failed, "xid {xid}");
            assert_eq!(gpu.status().reason, format!("Xid{xid}"));
        }
    }

    #[test]
    fn degraded_xids_degrade() {
        for xid in [63, 92, 94] {
            let mut gpu = GpuHealthTracker::default();
            gpu.apply(Fault::Xid(xid));
            assert_eq!(gpu.status().health, Health::Degraded, "xid {xid}");
        }
    }

    #[test]
    fn failed_stays_failed_until_validated_or_cleared() {
        let mut gpu = GpuHealthTracker::default();
        gpu.apply(Fault::Xid(79));
        // Milder faults and cooling do not lift it.
        assert!(!gpu.apply(Fault::Xid(63)));
        assert!(!gpu.apply(Fault::Xid(13)));
        assert!(!gpu.cooled_down());
        assert_eq!(gpu.status().health, Health::Failed);
        assert_eq!(gpu.status().reason, "Xid79");
        assert!(gpu.validation_passed());
        assert_eq!(gpu.status().health, Health::Healthy);
        assert_eq!(gpu.status().reason, "Validated");

        gpu.apply(Fault::GpuLost);
        assert!(gpu.admin_clear());
        assert_eq!(gpu.status().health, Health::Healthy);
        assert!(!gpu.admin_clear(), "clearing a healthy GPU is not a change");
    }

    #[test]
    fn degraded_escalates_to_failed_but_not_back() {
        let mut gpu = GpuHealthTracker::default();
        gpu.apply(Fault::SingleBitEccStorm);
        assert_eq!(gpu.status().health, Health::Degraded);
        assert!(gpu.apply(Fault::DoubleBitEcc));
        assert_eq!(gpu.status().health, Health::Failed);
        assert_eq!(gpu.status().reason, "DoubleBitEcc");
    }

    #[test]
    fn heat_verdict_lifts_when_cool_but_other_degradation_does_not() {
        let mut hot = GpuHealthTracker::default();
        hot.apply(Fault::Overheating);
        assert_eq!(hot.status().health, Health::Degraded);
        assert!(hot.cooled_down());
        assert_eq!(hot.status().health, Health::Healthy);

        let mut worn = GpuHealthTracker::default();
        worn.apply(Fault::MemoryWear);
        assert!(!worn.cooled_down());
        assert_eq!(worn.status().health, Health::Degraded);
    }

    #[test]
    fn samples_imply_heat_storm_and_wear() {
        let calm = SampleSignals {
            temperature_c: 60.0,
            slowdown_temperature_c: 90.0,
            ..Default::default()
        };
        assert!(faults_from_sample(None, &calm).is_empty());
        assert!(!has_cooled(&SampleSignals { temperature_c: 87.0, ..calm }));
        assert!(has_cooled(&calm));

        let hot = SampleSignals { temperature_c: 91.0, ..calm };
        assert_eq!(faults_from_sample(Some(&calm), &hot), vec![Fault::Overheating]);

        let storm = SampleSignals { ecc_corrected: ECC_STORM_THRESHOLD + 1, ..calm };
        assert_eq!(faults_from_sample(Some(&calm), &storm), vec![Fault::SingleBitEccStorm]);
        let slow_leak = SampleSignals { ecc_corrected: ECC_STORM_THRESHOLD, ..calm };
        assert!(faults_from_sample(Some(&calm), &slow_leak).is_empty());

        let worn = SampleSignals { row_remap_failure: true, ..calm };
        assert_eq!(faults_from_sample(Some(&calm), &worn), vec![Fault::MemoryWear]);
    }

    #[test]
    fn unknown_slowdown_threshold_gives_no_heat_verdict() {
        let s = SampleSignals {
            temperature_c: 120.0,
            slowdown_temperature_c: 0.0,
            ..Default::default()
        };
        assert!(faults_from_sample(None, &s).is_empty());
        assert!(!has_cooled(&s));
    }
}
