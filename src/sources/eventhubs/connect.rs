//! Connecting to the Event Hub: [`Connector`] opens clients with a connection string or a
//! Microsoft Entra ID credential.

use std::sync::Arc;

use azure_messaging_eventhubs::{ConsumerClient, RetryOptions};

use super::config::{Credential, EventHubsConfig};
use crate::secret::Secret;

enum Auth {
    ConnectionString(Secret),
    Token(Arc<dyn azure_core::credentials::TokenCredential>),
}

/// Opens `ConsumerClient`s (one per partition reader, one for management calls).
pub struct Connector {
    auth: Auth,
    pub(super) namespace: String,
    pub(super) hub: String,
    pub(super) group: String,
    endpoint: Option<String>,
    /// `connect_timeout`.
    timeout: std::time::Duration,
}

impl Connector {
    pub(super) fn new(cfg: &EventHubsConfig) -> anyhow::Result<Connector> {
        let (namespace, hub) = cfg.names().map_err(anyhow::Error::msg)?;
        let auth = match (&cfg.connection_string, &cfg.credential) {
            (Some(cs), None) => {
                // the key alone may appear in a library's message: redact it too
                if let Ok(parsed) = cs.expose().parse::<azure_messaging_eventhubs::ConnectionString>() {
                    if let Some(k) = parsed.shared_access_key {
                        crate::secret::register(k.secret());
                    }
                }
                Auth::ConnectionString(cs.clone())
            }
            (_, Some(c)) => Auth::Token(credential(c)?),
            (None, None) => anyhow::bail!("needs a connection string or a credential"),
        };
        Ok(Connector {
            auth,
            namespace,
            hub,
            group: cfg.consumer_group.clone(),
            endpoint: cfg.endpoint().map(str::to_string),
            timeout: cfg.connect_timeout.get()?,
        })
    }

    /// `f` within `connect_timeout`, else an error naming `what`. The AMQP stack has no timeout
    /// of its own for a peer that stops answering, and fe2o3-amqp's sender can wait for good for
    /// a first credit it missed (ARCHITECTURE.md, "Service Bus on fe2o3-amqp").
    pub async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("{what}: no answer in {:?}", self.timeout)),
        }
    }

    /// A connected client.
    pub async fn open(&self) -> anyhow::Result<ConsumerClient> {
        self.bounded("connecting", self.open_unbounded()).await
    }

    async fn open_unbounded(&self) -> anyhow::Result<ConsumerClient> {
        let mut b = ConsumerClient::builder()
            .with_consumer_group(self.group.clone())
            .with_application_id("centralflow".to_string())
            .with_retry_options(RetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(100),
                max_delay: azure_core::time::Duration::seconds(5),
                max_retries: 5,
                max_total_elapsed: azure_core::time::Duration::seconds(30),
            });
        if let Some(e) = &self.endpoint {
            b = b.with_custom_endpoint(e.clone());
        }
        let client = match &self.auth {
            Auth::ConnectionString(cs) => b.open_with_connection_string(cs.expose(), Some(&self.hub)).await,
            Auth::Token(c) => b.open(&self.namespace, self.hub.clone(), c.clone()).await,
        };
        client.map_err(|e| anyhow::anyhow!(crate::secret::redact(&e.to_string())))
    }
}

pub(crate) fn credential(c: &Credential) -> anyhow::Result<Arc<dyn azure_core::credentials::TokenCredential>> {
    use azure_identity::*;
    Ok(match c {
        Credential::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            }))?
        }
        Credential::WorkloadIdentity { client_id, tenant_id } => {
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                client_id: client_id.clone(),
                tenant_id: tenant_id.clone(),
                ..Default::default()
            }))?
        }
        Credential::ClientSecret { tenant_id, client_id, client_secret } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            azure_core::credentials::Secret::new(client_secret.expose().to_string()),
            None,
        )?,
        Credential::AzureCli { tenant_id } => AzureCliCredential::new(Some(AzureCliCredentialOptions {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        }))?,
    })
}
