//! The OpenAPI document, generated from the handlers' annotations and the
//! DTO types, so that it cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::*;
use super::problem::Problem;
use super::routes;

struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "labsync", description = "The inventory of labs on a fleet of Cisco Modeling Labs servers."),
    paths(
        routes::list_workers, routes::create_worker, routes::get_worker, routes::patch_worker, routes::delete_worker,
        routes::list_labs, routes::get_lab, routes::delete_lab, routes::get_delete_request, routes::cancel_delete_request,
        routes::refresh_worker, routes::refresh_all, routes::refresh_runs, routes::refresh_run, routes::audit,
        routes::check_settings, routes::check_worker,
        routes::healthz, routes::readyz, routes::metrics, routes::openapi, super::stream::stream,
    ),
    components(schemas(
        Problem, WorkerView, TlsView, WorkerCreate, WorkerPatch, RunReportView, LabFailureView, LabView, GroupView,
        LabPageView, LabDetailView, HistoryView, AuditView, AuditItemView, AuditPageView, DeleteOutcomeView, DeleteRequestView, AcceptedDelete,
        Health, Readiness, ConnectionCheckView,
    )),
    modifiers(&BearerTokens),
)]
struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
