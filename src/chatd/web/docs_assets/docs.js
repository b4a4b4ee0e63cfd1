// chatd's API docs: Swagger UI on this server's own OpenAPI document. Nothing is fetched from
// anywhere else (no validator badge, no CDN). "Authorize" takes a token (chatd token create)
// and keeps it in this browser's local storage for "Try it out".
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/api/v1/openapi.json",
    dom_id: "#docs",
    deepLinking: true,
    persistAuthorization: true,
    validatorUrl: null,
    defaultModelsExpandDepth: 1,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
