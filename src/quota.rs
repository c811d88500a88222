//! `gateway.quota_check: authz` (§11): the rate limiter's counting, run
//! inside the authz process, plugged into authz's `QuotaGate`. The two
//! service crates stay independent; this binary joins them.

use clawgress_authz::{QuotaGate, QuotaVerdict};
use clawgress_ratelimit::{RatelimitService, Subject};

pub struct Gate(pub RatelimitService);

#[tonic::async_trait]
impl QuotaGate for Gate {
    async fn check(
        &self,
        agent_id: &str,
        team_id: &str,
        project_id: &str,
    ) -> Result<QuotaVerdict, String> {
        let who = Subject {
            agent_id: agent_id.to_string(),
            team_id: team_id.to_string(),
            project_id: project_id.to_string(),
        };
        let o = self.0.admit(&who, 1).await.map_err(|e| e.to_string())?;
        Ok(QuotaVerdict {
            admitted: o.admitted,
            quota_applied: o.quota_applied.clone(),
            policy_id: o.policy_id.clone(),
            retry_after_s: o.retry_after_s,
            headers: clawgress_ratelimit::x_ratelimit_headers(&o),
        })
    }
}
