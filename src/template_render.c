/*
 * template_render.c
 *		Notification templates: checks a template's placeholders and renders
 *		it with the values of a JSON object, escaping them for the part
 *		being rendered.
 *
 * Syntax: {{name}} (spaces allowed inside the braces), name being a letter
 * or underscore followed by up to 62 letters, digits or underscores. A
 * placeholder is replaced by the top-level member of that name: strings as
 * they are, numbers and booleans in their JSON spelling, objects and arrays
 * as JSON text, null and missing members as nothing. Anything else that
 * starts with "{{" is an error, so a typo is caught when an administrator
 * saves the template rather than mailed to customers.
 *
 * Only values are escaped, never the template text (written by an
 * administrator): mode 'html' escapes & < > " ' so event data cannot inject
 * markup; mode 'header' (subjects) turns control characters, CR and LF
 * included, into spaces so data cannot add mail headers; mode 'text' copies
 * values unchanged. Output is capped at ES_TEMPLATE_MAX_OUTPUT bytes.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#define ES_TEMPLATE_MAX_NAME	63
#define ES_TEMPLATE_MAX_OUTPUT	(256 * 1024)

typedef enum EsRenderMode
{
	ES_RENDER_TEXT,
	ES_RENDER_HTML,
	ES_RENDER_HEADER
} EsRenderMode;

PG_FUNCTION_INFO_V1(eventshop_render_template);
PG_FUNCTION_INFO_V1(eventshop_template_placeholders);

static const char *es_parse_placeholder(const char *p, const char *end, const char *start,
										char *name);
static EsRenderMode es_render_mode(const text *mode);
static void es_append_value(StringInfo out, Jsonb *vars, const char *name, EsRenderMode mode);
static void es_append_escaped(StringInfo out, const char *s, int len, EsRenderMode mode);
static void es_check_output(const StringInfo out);

/*
 * Parses the placeholder starting at p (which points at "{{") into name;
 * returns the position after its "}}". Raises 22023 naming the character
 * position (1-based, in bytes from start) of a malformed one.
 */
static const char *
es_parse_placeholder(const char *p, const char *end, const char *start, char *name)
{
	const char *open = p;
	int			len = 0;

	p += 2;
	while (p < end && *p == ' ')
		p++;
	if (p < end && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_'))
	{
		while (p < end && len < ES_TEMPLATE_MAX_NAME &&
			   ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
				(*p >= '0' && *p <= '9') || *p == '_'))
			name[len++] = *p++;
	}
	name[len] = '\0';
	while (p < end && *p == ' ')
		p++;
	if (len == 0 || end - p < 2 || p[0] != '}' || p[1] != '}')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed placeholder at byte %d of the template", (int) (open - start) + 1),
				 errhint("Placeholders look like {{name}}: a letter or underscore, then up to 62 letters, digits or underscores.")));
	return p + 2;
}

/* The mode argument: 'text', 'html' or 'header'. */
static EsRenderMode
es_render_mode(const text *mode)
{
	char	   *m = text_to_cstring(mode);

	if (strcmp(m, "text") == 0)
		return ES_RENDER_TEXT;
	if (strcmp(m, "html") == 0)
		return ES_RENDER_HTML;
	if (strcmp(m, "header") == 0)
		return ES_RENDER_HEADER;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown rendering mode \"%s\"", m),
			 errhint("Use text, html or header.")));
	return ES_RENDER_TEXT;		/* not reached */
}

/* Appends the member called name of vars (an object), escaped for mode; nothing if absent or null. */
static void
es_append_value(StringInfo out, Jsonb *vars, const char *name, EsRenderMode mode)
{
	JsonbValue	key;
	JsonbValue *value;

	if (!JB_ROOT_IS_OBJECT(vars))
		return;
	key.type = jbvString;
	key.val.string.val = (char *) name;
	key.val.string.len = strlen(name);
	value = findJsonbValueFromContainer(&vars->root, JB_FOBJECT, &key);
	if (value == NULL)
		return;
	switch (value->type)
	{
		case jbvNull:
			break;
		case jbvString:
			es_append_escaped(out, value->val.string.val, value->val.string.len, mode);
			break;
		case jbvBool:
			es_append_escaped(out, value->val.boolean ? "true" : "false",
							  value->val.boolean ? 4 : 5, mode);
			break;
		case jbvNumeric:
			{
				char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out,
																	NumericGetDatum(value->val.numeric)));

				es_append_escaped(out, s, strlen(s), mode);
				break;
			}
		default:
			{
				/* objects and arrays come back as binary containers */
				char	   *s = JsonbToCString(NULL, value->val.binary.data, value->val.binary.len);

				es_append_escaped(out, s, strlen(s), mode);
				break;
			}
	}
	es_check_output(out);
}

/* Appends len bytes of a value, escaped for mode. */
static void
es_append_escaped(StringInfo out, const char *s, int len, EsRenderMode mode)
{
	for (int i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (mode == ES_RENDER_HTML)
		{
			switch (c)
			{
				case '&':
					appendStringInfoString(out, "&amp;");
					continue;
				case '<':
					appendStringInfoString(out, "&lt;");
					continue;
				case '>':
					appendStringInfoString(out, "&gt;");
					continue;
				case '"':
					appendStringInfoString(out, "&quot;");
					continue;
				case '\'':
					appendStringInfoString(out, "&#39;");
					continue;
			}
		}
		else if (mode == ES_RENDER_HEADER && (c < 0x20 || c == 0x7f))
			c = ' ';
		appendStringInfoChar(out, (char) c);
	}
}

/* Raises 54000 once the output passes its cap, so a huge value cannot bloat the queue. */
static void
es_check_output(const StringInfo out)
{
	if (out->len > ES_TEMPLATE_MAX_OUTPUT)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("rendered notification is longer than %d bytes", ES_TEMPLATE_MAX_OUTPUT)));
}

/* _render_template(template text, vars jsonb, mode text) -> the rendered text. */
Datum
eventshop_render_template(PG_FUNCTION_ARGS)
{
	text	   *template = PG_GETARG_TEXT_PP(0);
	Jsonb	   *vars = PG_GETARG_JSONB_P(1);
	EsRenderMode mode = es_render_mode(PG_GETARG_TEXT_PP(2));
	const char *start = VARDATA_ANY(template);
	const char *end = start + VARSIZE_ANY_EXHDR(template);
	const char *p = start;
	char		name[ES_TEMPLATE_MAX_NAME + 1];
	StringInfoData out;

	initStringInfo(&out);
	while (p < end)
	{
		const char *next = p;

		while (next < end && !(next[0] == '{' && next + 1 < end && next[1] == '{'))
			next++;
		appendBinaryStringInfo(&out, p, (int) (next - p));
		es_check_output(&out);
		if (next >= end)
			break;
		p = es_parse_placeholder(next, end, start, name);
		es_append_value(&out, vars, name, mode);
	}
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out.data, out.len));
}

/* _template_placeholders(template text) -> the distinct placeholder names; 22023 if one is malformed. */
Datum
eventshop_template_placeholders(PG_FUNCTION_ARGS)
{
	text	   *template = PG_GETARG_TEXT_PP(0);
	const char *start = VARDATA_ANY(template);
	const char *end = start + VARSIZE_ANY_EXHDR(template);
	const char *p = start;
	char		name[ES_TEMPLATE_MAX_NAME + 1];
	ArrayBuildState *names = initArrayResult(TEXTOID, CurrentMemoryContext, false);
	List	   *seen = NIL;

	while (p < end)
	{
		ListCell   *lc;
		bool		found = false;

		if (!(p[0] == '{' && p + 1 < end && p[1] == '{'))
		{
			p++;
			continue;
		}
		p = es_parse_placeholder(p, end, start, name);
		foreach(lc, seen)
			found = found || strcmp((char *) lfirst(lc), name) == 0;
		if (!found)
		{
			seen = lappend(seen, pstrdup(name));
			accumArrayResult(names, CStringGetTextDatum(name), false, TEXTOID, CurrentMemoryContext);
		}
	}
	PG_RETURN_DATUM(makeArrayResult(names, CurrentMemoryContext));
}
