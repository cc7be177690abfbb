// The API page: a table of the routes of /openapi.json (method, path, summary and description), without a CDN.
"use strict";

(async () => {
  const body = document.querySelector("#routes tbody");
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw new Error(`/openapi.json answered ${response.status}`);
    const schema = await response.json();
    for (const [path, operations] of Object.entries(schema.paths)) {
      for (const [method, operation] of Object.entries(operations)) {
        const row = body.insertRow();
        row.insertCell().textContent = method.toUpperCase();
        const where = document.createElement("code");
        where.textContent = path;
        row.insertCell().append(where);
        const what = [operation.summary, operation.description].filter(Boolean);
        row.insertCell().textContent = [...new Set(what)].join(": ");
      }
    }
  } catch (err) {
    const shown = document.getElementById("api-error");
    shown.textContent = `The schema could not be read: ${err.message}`;
    shown.hidden = false;
  }
})();
