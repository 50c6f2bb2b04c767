//! NVIDIA XID error codes, classified as the fleet treats them (REFERENCE.md's table).
//!
//! The agent turns a class into a GPU's health; the operator counts faults by class in its
//! metrics. Application XIDs never condemn a GPU (DESIGN.md safety rule 3).

use serde::Serialize;

/// What an XID says about the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum XidClass {
    /// The job's fault (13, 31, 43, 45, 68, 109); the GPU stays healthy.
    Application,
    /// Fatal hardware fault; the GPU is Failed.
    HardwareFatal,
    /// The GPU needs a reset or reboot; Failed until reset and validated.
    ResetRequired,
    /// Usable but worn: drain and validate.
    Degraded,
    /// Not in our table; treated as Failed, conservatively.
    Unknown,
}

/// Classifies an XID code.
pub fn classify_xid(xid: u32) -> XidClass {
    match xid {
        13 | 31 | 43 | 45 | 68 | 109 => XidClass::Application,
        48 | 62 | 64 | 74 | 79 | 95 | 119 | 120 | 140 => XidClass::HardwareFatal,
        44 | 61 | 65 | 154 => XidClass::ResetRequired,
        63 | 92 | 94 => XidClass::Degraded,
        _ => XidClass::Unknown,
    }
}

impl XidClass {
    /// Every class, in order of the table.
    pub const ALL: [XidClass; 5] = [
        XidClass::Application,
        XidClass::HardwareFatal,
        XidClass::ResetRequired,
        XidClass::Degraded,
        XidClass::Unknown,
    ];

    /// The value of the `class` label on fault metrics: `application`, `hardware-fatal`,
    /// `hardware-reset`, `degraded` or `unknown`.
    pub fn metric_label(self) -> &'static str {
        match self {
            XidClass::Application => "application",
            XidClass::HardwareFatal => "hardware-fatal",
            XidClass::ResetRequired => "hardware-reset",
            XidClass::Degraded => "degraded",
            XidClass::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        for xid in [13, 31, 43, 45, 68, 109] {
            assert_eq!(classify_xid(xid), XidClass::Application, "xid {xid}");
        }
        for xid in [48, 62, 64, 74, 79, 95, 119, 120, 140] {
            assert_eq!(classify_xid(xid), XidClass::HardwareFatal, "xid {xid}");
        }
        for xid in [44, 61, 65, 154] {
            assert_eq!(classify_xid(xid), XidClass::ResetRequired, "xid {xid}");
        }
        for xid in [63, 92, 94] {
            assert_eq!(classify_xid(xid), XidClass::Degraded, "xid {xid}");
        }
        for xid in [0, 1, 9999] {
            assert_eq!(classify_xid(xid), XidClass::Unknown, "xid {xid}");
        }
    }

    #[test]
    fn metric_labels_are_the_operators() {
        let labels: Vec<_> = XidClass::ALL.iter().map(|c| c.metric_label()).collect();
        assert_eq!(
            labels,
            ["application", "hardware-fatal", "hardware-reset", "degraded", "unknown"]
        );
        assert_eq!(classify_xid(79).metric_label(), "hardware-fatal");
        assert_eq!(classify_xid(44).metric_label(), "hardware-reset");
    }
}
